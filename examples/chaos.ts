// npm run chaos: the demo cluster, headless, in both modes. Virtual users fill their carts while memcached nodes
// are SIGKILLed, restarted empty and frozen (SIGSTOP), and an app instance is killed together with a node; then
// every cart is read back. Exits 1 if a single acknowledged write is missing.
//   npm run chaos -- --users=50 --writes=100 --seconds=60      (defaults: 40 users, 60 writes, 30 s)
//   npm run chaos -- --mode=sticky                             (one mode only)
import { type ChaosReport, runChaos } from './cluster/chaos.js'
import { DemoCluster, type SessionMode } from './cluster/cluster.js'

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

// Ctrl-C or a kill: stop every process the run started before going.
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(signal, () => {
    console.log(`\n${signal}: stopping every process the chaos run started...`)
    void DemoCluster.stopAll().finally(() => process.exit(130))
  })
}

const reports: ChaosReport[] = []
for (const mode of modes) {
  console.log(`\n${mode}: ${users} users × ${writesPerUser} cart writes over ${durationMs / 1000} s`)
  reports.push(await runChaos({ mode, users, writesPerUser, durationMs, log: console.log }))
}

const failed = (r: ChaosReport) => Object.values(r.failures).reduce((sum, n) => sum + n, 0)
const columns = [
  'mode',
  'requests',
  'acknowledged',
  'lost',
  'foreign',
  'failed',
  'relocations',
  'takeovers',
  'p50 ms',
  'p99 ms',
]
console.log(`\n${columns.map((c) => c.padStart(13)).join('')}`)
for (const r of reports) {
  const row = [
    r.mode,
    r.requests,
    r.acknowledged,
    r.lost,
    r.foreign,
    failed(r),
    r.relocations,
    r.takeovers,
    r.p50Ms,
    r.p99Ms,
  ]
  console.log(row.map((value) => String(value).padStart(13)).join(''))
}
for (const r of reports) {
  const causes = Object.entries(r.failures).map(([cause, count]) => `${count} × ${cause}`)
  if (causes.length > 0) console.log(`${r.mode}: failed requests (never acknowledged): ${causes.join(', ')}`)
}
const broken = reports.reduce((sum, r) => sum + r.lost + r.foreign, 0)
console.log(
  broken === 0
    ? "\nNo acknowledged write was lost, and no cart held another user's items."
    : `\n${broken} acknowledged writes were LOST or carts held FOREIGN items.`,
)
process.exit(broken === 0 ? 0 : 1)
