// Where the time goes: one layer under load with `node --cpu-prof`, then the functions with the most self time
// and the library's functions with the most inclusive time. With --alloc, where the garbage comes from instead:
// bytes allocated per request, by the function that allocated them (bench/alloc-sampler.ts). With --latency, where
// the latency goes: time inside the app per request, garbage-collection pauses, event-loop delay and CPU per
// request (bench/latency-probe.ts), for any layer, the peers included.
//   npx tsx bench/profile.ts session-failover/none read    (read, write or mix)
//   npx tsx bench/profile.ts session-failover/auto write --alloc
//   npx tsx bench/profile.ts connect-redis write --latency
// --no-inlining runs the app without inlining, so each function is charged with its own allocations and time
// (slower, so read its figures against each other, not against a normal run).
// --top=N lists N functions in each list (default 25).
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import { startCluster, stopAllMemcached } from '../test/support/memcached.js'
import { startRedis, stopAllRedis } from '../test/support/redis.js'
import type { LatencyProfile } from './latency-probe.js'
import { LAYERS, type Layer } from './layers.js'

interface ProfileNode {
  id: number
  callFrame: { functionName: string; url: string; lineNumber: number }
  children?: number[]
}

const flags = process.argv.slice(2).filter((arg) => arg.startsWith('--'))
const alloc = flags.includes('--alloc')
const latency = flags.includes('--latency')
// Optimized code charges what an inlined function allocates (or spends) to the function it was inlined into.
const noInlining = flags.includes('--no-inlining')
if (alloc && latency) throw new Error('--alloc and --latency are separate runs: one of them at a time')
const listed = Number(flags.find((flag) => flag.startsWith('--top='))?.slice('--top='.length) ?? 25)
const [layer = 'session-failover/none', workload = 'read'] = process.argv
  .slice(2)
  .filter((arg) => !arg.startsWith('--')) as [Layer, string]
if (!LAYERS.includes(layer)) throw new Error(`the layer must be one of ${LAYERS.join(', ')}`)
execFileSync('npm', ['run', 'build'], { stdio: 'ignore' })
const dir = mkdtempSync(join(tmpdir(), 'sf-profile-'))
const servers = await startCluster(2)
const redis = layer === 'connect-redis' ? await startRedis() : undefined
const preload = (name: string) => ['--import', fileURLToPath(new URL(name, import.meta.url))]
const child: ChildProcess = spawn(
  process.execPath,
  [
    ...(alloc || latency ? [] : ['--cpu-prof', `--cpu-prof-dir=${dir}`]),
    '--import',
    'tsx',
    ...(alloc ? preload('./alloc-sampler.ts') : []),
    ...(noInlining ? ['--no-turbo-inlining'] : []),
    ...(latency ? preload('./latency-probe.ts') : []),
    fileURLToPath(new URL('./app.ts', import.meta.url)),
  ],
  {
    env: {
      ...process.env,
      ALLOC_PROFILE: alloc ? join(dir, 'app.heapprofile') : '',
      LATENCY_PROFILE: latency ? join(dir, 'app.latency.json') : '',
      NODE_ENV: 'production',
      BENCH_LAYER: layer,
      BENCH_REDIS: redis ? `redis://127.0.0.1:${redis.port}` : '',
      BENCH_MEMCACHED: servers.map((server) => `127.0.0.1:${server.port}`).join(' '),
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  },
)
const port = await new Promise<number>((resolve) => {
  child.stdout?.on('data', (chunk: Buffer) => {
    const match = /LISTENING (\d+)/.exec(chunk.toString())
    if (match) resolve(Number(match[1]))
  })
})
const url = `http://127.0.0.1:${port}`
const cookies: string[] = []
for (let i = 0; i < 50; i++) {
  const response = await fetch(`${url}/init`, { method: 'POST' })
  cookies.push(response.headers.getSetCookie()[0]?.split(';')[0] ?? '')
}
let next = 0
const result = await autocannon({
  url,
  connections: 50,
  duration: 8,
  // 'mix': four reads, then a write, on every connection (as bench/run.ts).
  requests: (workload === 'mix'
    ? ['read', 'read', 'read', 'read', 'write']
    : [workload === 'read' ? 'read' : 'write']
  ).map((kind) => ({
    method: kind === 'read' ? 'GET' : 'POST',
    path: `/${kind}`,
    setupRequest: (request: object, context: object) => {
      const ctx = context as { cookie?: string }
      ctx.cookie ??= cookies[next++ % cookies.length]
      return {
        ...request,
        headers: { ...(request as { headers?: object }).headers, cookie: ctx.cookie as string },
      }
    },
  })),
})
console.log(`${layer} ${workload}: ${result.requests.average.toFixed(0)} req/s, p99 ${result.latency.p99} ms`)
child.kill('SIGINT')
await new Promise((resolve) => child.once('exit', resolve))
await stopAllMemcached()
await stopAllRedis()

const name = (node: Pick<ProfileNode, 'callFrame'>) =>
  `${node.callFrame.functionName || '(anonymous)'} ${node.callFrame.url.replace(/^.*node_modules\//, '').replace(/^file:\/\/.*\/(dist|bench)\//, '$1/')}:${node.callFrame.lineNumber}`
const requests = result.requests.total

if (alloc) {
  allocReport()
  process.exit(0)
}
if (latency) {
  latencyReport()
  process.exit(0)
}

/** Time in the app by request method, then what stretches it: GC pauses and the event loop's delay. */
function latencyReport(): void {
  const profile = JSON.parse(readFileSync(join(dir, 'app.latency.json'), 'utf8')) as LatencyProfile
  const ms = (value: number) => value.toFixed(1).padStart(5)
  const at = (sorted: number[], share: number) =>
    sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * share))] ?? 0
  const lines = Object.entries(profile.inApp).map(([method, times]) => {
    const mean = times.reduce((sum, time) => sum + time, 0) / times.length
    return `${method.padEnd(6)} ${String(times.length).padStart(7)} requests  mean ${ms(mean)}  p50 ${ms(at(times, 0.5))}  p90 ${ms(at(times, 0.9))}  p99 ${ms(at(times, 0.99))}  max ${ms(at(times, 1))} ms`
  })
  const seconds = profile.wallMs / 1000
  const gc = Object.entries(profile.gc).map(
    ([kind, { count, totalMs, maxMs }]) =>
      `${kind.padEnd(18)} ${(count / seconds).toFixed(1).padStart(5)}/s  mean ${ms(totalMs / count)}  max ${ms(maxMs)} ms  ${((totalMs / profile.wallMs) * 100).toFixed(1).padStart(4)} % of the time`,
  )
  const { p50, p99, max } = profile.loopDelay
  console.log(
    `\ntime in the app, arrival to the response's end\n${lines.join('\n')}\n\ngarbage collection pauses\n${gc.join('\n')}\n\nevent loop delay  p50 ${ms(p50)}  p99 ${ms(p99)}  max ${ms(max)} ms\napp CPU per request ${profile.cpuMicrosPerRequest.toFixed(0)} µs`,
  )
}

/** Bytes allocated per request by each function (sampled, so small figures are rough). */
function allocReport(): void {
  interface AllocNode extends Pick<ProfileNode, 'callFrame'> {
    selfSize: number
    children: AllocNode[]
  }
  const { head } = JSON.parse(readFileSync(join(dir, 'app.heapprofile'), 'utf8')) as { head: AllocNode }
  const bytes = new Map<string, number>()
  const walk = (node: AllocNode): void => {
    bytes.set(name(node), (bytes.get(name(node)) ?? 0) + node.selfSize)
    for (const child of node.children) walk(child)
  }
  walk(head)
  const total = [...bytes.values()].reduce((sum, size) => sum + size, 0)
  const lines = [...bytes]
    .sort((a, b) => b[1] - a[1])
    .slice(0, listed)
    .map(([key, size]) => `${(size / requests).toFixed(0).padStart(7)} B/req  ${key}`)
  console.log(`\nallocated: ${(total / requests).toFixed(0)} B/req\n${lines.join('\n')}`)
}

// The main thread's profile is the largest (tsx's loader thread writes one too).
const file = readdirSync(dir)
  .filter((name) => name.endsWith('.cpuprofile'))
  .map((name) => join(dir, name))
  .sort((a, b) => statSync(b).size - statSync(a).size)[0] as string
const profile = JSON.parse(readFileSync(file, 'utf8')) as {
  nodes: ProfileNode[]
  samples: number[]
  timeDeltas: number[]
}
const byId = new Map(profile.nodes.map((node) => [node.id, node]))
const parentOf = new Map<number, number>()
for (const node of profile.nodes) for (const child of node.children ?? []) parentOf.set(child, node.id)
const timeOf = new Map<number, number>()
for (const [index, id] of profile.samples.entries()) {
  timeOf.set(id, (timeOf.get(id) ?? 0) + (profile.timeDeltas[index] ?? 0))
}
const total = profile.timeDeltas.reduce((sum, delta) => sum + delta, 0)
const self = new Map<string, number>()
const inclusive = new Map<string, number>()
for (const [id, time] of timeOf) {
  const node = byId.get(id) as ProfileNode
  self.set(name(node), (self.get(name(node)) ?? 0) + time)
  const seen = new Set<string>()
  for (let at: number | undefined = id; at !== undefined; at = parentOf.get(at)) {
    const frame = byId.get(at) as ProfileNode
    const key = name(frame)
    if (frame.callFrame.url.includes('/dist/') && !seen.has(key)) {
      seen.add(key)
      inclusive.set(key, (inclusive.get(key) ?? 0) + time)
    }
  }
}
// Per request as well as in per cent, so two layers' profiles compare in absolute terms.
const top = (map: Map<string, number>, count: number) =>
  [...map]
    .sort((a, b) => b[1] - a[1])
    .slice(0, count)
    .map(
      ([key, time]) =>
        `${((time / total) * 100).toFixed(1).padStart(5)} %  ${(time / requests).toFixed(1).padStart(6)} µs/req  ${key}`,
    )
    .join('\n')
console.log(
  `\nself time\n${top(self, listed)}\n\ninclusive time in session-failover\n${top(inclusive, listed)}`,
)
child.removeAllListeners()
