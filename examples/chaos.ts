// npm run chaos: the demo cluster, headless, in both modes. Virtual users fill their carts while memcached nodes
// are SIGKILLed, restarted empty and frozen (SIGSTOP), and an app instance is killed together with a node; then
// every cart is read back. Exits 1 if a single acknowledged write is missing.
//   npm run chaos -- --users=50 --writes=100 --seconds=60      (defaults: 40 users, 60 writes, 30 s)
//   npm run chaos -- --mode=sticky                             (one mode only)
import { type ChaosReport, runChaos } from './cluster/chaos.js'
import type { SessionMode } from './cluster/cluster.js'

const option = (name: string, fallback: number): number => {
  const argument = process.argv.find((a) => a.startsWith(`--${name}=`))
  const value = argument ? Number(argument.slice(name.length + 3)) : fallback
  if (!Number.isInteger(value) || value < 1) {
    console.error(`--${name} must be a whole number from 1 up, got ${argument}`)
    process.exit(2)
  }
  return value
}
const users = option('users', 40)
const writesPerUser = option('writes', 60)
const durationMs = option('seconds', 30) * 1000
const only = process.argv.find((a) => a.startsWith('--mode='))?.slice('--mode='.length)
if (only !== undefined && only !== 'sticky' && only !== 'non-sticky') {
  console.error(`--mode must be sticky or non-sticky, got ${only}`)
  process.exit(2)
}
const modes: SessionMode[] = only ? [only] : ['non-sticky', 'sticky']

const reports: ChaosReport[] = []
for (const mode of modes) {
  console.log(`\n${mode}: ${users} users × ${writesPerUser} cart writes over ${durationMs / 1000} s`)
  reports.push(await runChaos({ mode, users, writesPerUser, durationMs, log: console.log }))
}

const columns = [
  'mode',
  'requests',
  'acknowledged',
  'lost',
  'failed',
  'relocations',
  'takeovers',
  'p50 ms',
  'p99 ms',
]
console.log(`\n${columns.map((c) => c.padStart(14)).join('')}`)
for (const r of reports) {
  const row = [
    r.mode,
    r.requests,
    r.acknowledged,
    r.lost,
    r.failed,
    r.relocations,
    r.takeovers,
    r.p50Ms,
    r.p99Ms,
  ]
  console.log(row.map((value) => String(value).padStart(14)).join(''))
}
const lost = reports.reduce((sum, r) => sum + r.lost, 0)
console.log(
  lost === 0
    ? '\nNo acknowledged write was lost.'
    : `\n${lost} acknowledged writes were LOST. "failed" requests were never acknowledged and do not count.`,
)
process.exit(lost === 0 ? 0 : 1)
