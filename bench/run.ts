// npm run bench: every session layer against the same small app, in turn, on this machine, with real memcached
// and Redis; then a failover timeline. Writes bench/results.json, BENCHMARKS.md and bench/chart.svg.
//   npm run bench -- --quick                     one short round per case (a smoke run)
//   npm run bench -- --layers=connect-redis,session-failover/auto --workloads=read --sizes=small
//   npm run bench -- --only-timeline               the failover timeline alone
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import { startCluster, stopAllMemcached } from '../test/support/memcached.js'
import { announcedPort } from '../test/support/process.js'
import { startRedis, stopAllRedis } from '../test/support/redis.js'
import { LAYERS, type Layer } from './layers.js'
import { writeReport } from './report.js'

export const WORKLOADS = ['read', 'write', 'mix'] as const
export type Workload = (typeof WORKLOADS)[number]
export const SIZES = { small: 150, large: 20_000 } as const
export type Size = keyof typeof SIZES

export interface CaseResult {
  readonly layer: Layer
  readonly workload: Workload
  readonly size: Size
  /** Medians over the rounds. */
  readonly rps: number
  readonly p50: number
  readonly p99: number
  /** The app process's CPU time per request, in microseconds (median over the rounds): the cost of the layer itself,
   * and far steadier on a shared machine than req/s. */
  readonly cpuMicros?: number
  /** Requests that failed: errors, timeouts and non-2xx answers, over all rounds. */
  readonly errors: number
  readonly non2xx: number
  /**
   * Writes answered 200 whose increment is missing from the sessions' stored counts afterwards, over warm-up and
   * rounds: updates lost to parallel requests of one session. A lower bound (a write still in flight when a run
   * ends may be stored unanswered). Absent for the read-only workload.
   */
  readonly lostWrites?: number
  readonly rounds: readonly { rps: number; p50: number; p99: number; cpuMicros: number }[]
}

export interface TimelineResult {
  readonly layer: Layer
  readonly killedAtMs: number
  readonly windowMs: number
  /** Per window: requests, errors and non-2xx answers, and the worst and median latency (ms). */
  readonly windows: readonly { t: number; requests: number; failed: number; max: number; p50: number }[]
  readonly baselineP99: number
  readonly worstAfterKill: number
  readonly failed: number
  readonly recoveredAfterMs: number | null
}

const option = (name: string): string | undefined =>
  process.argv.find((arg) => arg.startsWith(`--${name}=`))?.slice(name.length + 3)
const quick = process.argv.includes('--quick')
const onlyTimeline = process.argv.includes('--only-timeline')
const layers = (option('layers')?.split(',') ?? LAYERS) as Layer[]
const workloads = (option('workloads')?.split(',') ?? WORKLOADS) as Workload[]
const sizes = (option('sizes')?.split(',') ?? Object.keys(SIZES)) as Size[]
const rounds = Number(option('rounds') ?? (quick ? 1 : 5))
const seconds = Number(option('duration') ?? (quick ? 2 : 5))
const warmupSeconds = quick ? 1 : 3
const CONNECTIONS = 50
/** Linux's USER_HZ, the unit of /proc/<pid>/stat's CPU times. */
const CLOCK_TICKS = Number(execFileSync('getconf', ['CLK_TCK']).toString())

const appMain = fileURLToPath(new URL('./app.ts', import.meta.url))

/** App processes running, killed with the servers when the run is interrupted. */
const runningApps = new Set<ChildProcess>()

async function startApp(layer: Layer, size: Size, env: Record<string, string>) {
  const child: ChildProcess = spawn(process.execPath, ['--import', 'tsx', appMain], {
    env: {
      ...process.env,
      ...env,
      NODE_ENV: 'production',
      BENCH_LAYER: layer,
      BENCH_SESSION_BYTES: String(SIZES[size]),
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  runningApps.add(child)
  child.once('exit', () => runningApps.delete(child))
  const port = await announcedPort(child, `${layer} app`, 30_000)
  return {
    url: `http://127.0.0.1:${port}`,
    /** User plus system CPU time of the app process so far, in microseconds. */
    cpuMicros: () => {
      const fields = readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? []
      return ((Number(fields[11]) + Number(fields[12])) * 1e6) / CLOCK_TICKS
    },
    stop: () =>
      new Promise<void>((resolve) => {
        child.once('exit', () => resolve())
        child.kill('SIGKILL')
      }),
  }
}

/** One session per connection, each holding the payload. */
async function sessionCookies(url: string): Promise<string[]> {
  const cookies: string[] = []
  for (let i = 0; i < CONNECTIONS; i++) {
    const response = await fetch(`${url}/init`, { method: 'POST' })
    const cookie = response.headers.getSetCookie()[0]?.split(';')[0]
    if (response.status !== 200 || !cookie) throw new Error(`POST /init answered ${response.status}`)
    cookies.push(cookie)
  }
  return cookies
}

type Request = NonNullable<autocannon.Options['requests']>[number]

/**
 * Each request takes the next session in turn (autocannon resets a connection's context when it starts its list of
 * requests again), and keeps the cookie it is given, as a browser does: after a failover that is the session's
 * new id. A load generator that kept sending the old id would measure a relocation path no browser takes.
 */
function requestsFor(workload: Workload, cookies: string[], acknowledged: { writes: number }): Request[] {
  let next = 0
  const withCookie = (method: 'GET' | 'POST', path: string, acknowledge?: () => void): Request => ({
    method,
    path,
    setupRequest: (request, context) => {
      const ctx = context as { session?: number }
      ctx.session ??= next++ % cookies.length
      return { ...request, headers: { ...request.headers, cookie: cookies[ctx.session] as string } }
    },
    onResponse: (status, _body, context, headers) => {
      if (status === 200) acknowledge?.()
      const session = (context as { session?: number }).session
      const given = headers?.['set-cookie'] ?? headers?.['Set-Cookie']
      const cookie = (Array.isArray(given) ? given[0] : given)?.split(';')[0]
      if (session !== undefined && cookie) cookies[session] = cookie
    },
  })
  const read = withCookie('GET', '/read')
  const write = withCookie('POST', '/write', () => acknowledged.writes++)
  if (workload === 'read') return [read]
  if (workload === 'write') return [write]
  return [read, read, read, read, write] // 80 % read, 20 % write, on every connection
}

/** The sum of the sessions' stored counts: each acknowledged write added one. */
async function storedCount(url: string, cookies: readonly string[]): Promise<number> {
  let total = 0
  for (const cookie of cookies) {
    const response = await fetch(`${url}/read`, { headers: { cookie } })
    total += ((await response.json()) as { count?: number }).count ?? 0
  }
  return total
}

function run(url: string, requests: Request[], duration: number) {
  return autocannon({ url, connections: CONNECTIONS, duration, requests })
}

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)] as number
}

/**
 * One workload and session size across every layer. All the apps are started first; each round then runs every
 * layer once, in an order that rotates from round to round, so a slow spell of this shared machine hits all
 * layers alike instead of whichever happened to be running.
 */
async function measureCase(
  workload: Workload,
  size: Size,
  env: Record<string, string>,
): Promise<CaseResult[]> {
  const apps = new Map<Layer, Awaited<ReturnType<typeof startApp>>>()
  try {
    for (const layer of layers) apps.set(layer, await startApp(layer, size, env))
    // Per layer: its sessions' cookies, the writes answered 200, and the requests autocannon sends.
    const loads = new Map<
      Layer,
      { cookies: string[]; acknowledged: { writes: number }; requests: Request[] }
    >()
    for (const [layer, app] of apps) {
      const cookies = await sessionCookies(app.url)
      const acknowledged = { writes: 0 }
      const load = { cookies, acknowledged, requests: requestsFor(workload, cookies, acknowledged) }
      loads.set(layer, load)
      await run(app.url, load.requests, warmupSeconds)
    }
    const measured = new Map<
      Layer,
      { rps: number; p50: number; p99: number; cpuMicros: number; failed: number }[]
    >(layers.map((layer) => [layer, []]))
    for (let round = 0; round < rounds; round++) {
      const order = layers.map((_, index) => layers[(index + round) % layers.length] as Layer)
      for (const layer of order) {
        const app = apps.get(layer) as Awaited<ReturnType<typeof startApp>>
        const cpuBefore = app.cpuMicros()
        const result = await run(app.url, loads.get(layer)?.requests ?? [], seconds)
        measured.get(layer)?.push({
          cpuMicros: (app.cpuMicros() - cpuBefore) / Math.max(1, result.requests.total),
          rps: result.requests.average,
          p50: result.latency.p50,
          p99: result.latency.p99,
          failed: result.errors + result.timeouts + result.non2xx,
        })
      }
    }
    const lost = new Map<Layer, number>()
    if (workload !== 'read') {
      for (const [layer, app] of apps) {
        const load = loads.get(layer)
        if (!load) continue
        lost.set(layer, Math.max(0, load.acknowledged.writes - (await storedCount(app.url, load.cookies))))
      }
    }
    return layers.map((layer) => {
      const rounds = measured.get(layer) ?? []
      const summary: CaseResult = {
        layer,
        workload,
        size,
        rps: median(rounds.map((r) => r.rps)),
        p50: median(rounds.map((r) => r.p50)),
        p99: median(rounds.map((r) => r.p99)),
        cpuMicros: median(rounds.map((r) => r.cpuMicros)),
        errors: rounds.reduce((sum, r) => sum + r.failed, 0),
        non2xx: 0,
        ...(lost.has(layer) ? { lostWrites: lost.get(layer) } : {}),
        rounds: rounds.map(({ rps, p50, p99, cpuMicros }) => ({ rps, p50, p99, cpuMicros })),
      }
      console.log(
        `${layer.padEnd(32)} ${workload.padEnd(5)} ${size.padEnd(5)} ${summary.rps.toFixed(0).padStart(7)} req/s  p50 ${summary.p50} ms  p99 ${summary.p99} ms  cpu ${summary.cpuMicros?.toFixed(0)} µs/req${summary.errors ? `  failed ${summary.errors}` : ''}${summary.lostWrites ? `  lost writes ${summary.lostWrites}` : ''}`,
      )
      return summary
    })
  } finally {
    await Promise.all([...apps.values()].map((app) => app.stop()))
  }
}

/** Under a 80/20 load, SIGKILL the node holding the first session at `killAtMs`; latency per window around it. */
async function failoverTimeline(
  layer: Layer,
  env: Record<string, string>,
  kill: () => Promise<void>,
): Promise<TimelineResult> {
  const windowMs = 250
  const killAtMs = 4000
  const durationSeconds = 12
  const app = await startApp(layer, 'small', env)
  try {
    const cookies = await sessionCookies(app.url)
    await run(app.url, requestsFor('mix', cookies, { writes: 0 }), warmupSeconds)
    const buckets = new Map<number, { latencies: number[]; failed: number }>()
    const started = Date.now()
    let finished: () => void = () => {}
    const done = new Promise<void>((resolve) => {
      finished = resolve
    })
    const instance = autocannon(
      {
        url: app.url,
        connections: CONNECTIONS,
        duration: durationSeconds,
        requests: requestsFor('mix', cookies, { writes: 0 }),
      },
      () => finished(),
    )
    const bucket = () => {
      const t = Math.floor((Date.now() - started) / windowMs) * windowMs
      let entry = buckets.get(t)
      if (!entry) {
        entry = { latencies: [], failed: 0 }
        buckets.set(t, entry)
      }
      return entry
    }
    instance.on('response', (_client: unknown, statusCode: number, _bytes: number, responseTime: number) => {
      const entry = bucket()
      entry.latencies.push(responseTime)
      if (statusCode < 200 || statusCode >= 300) entry.failed++
    })
    instance.on('reqError', () => {
      bucket().failed++
    })
    const killer = new Promise<void>((resolve) => setTimeout(() => void kill().then(resolve), killAtMs))
    await Promise.all([done, killer])
    const windows = [...buckets.entries()]
      .sort(([a], [b]) => a - b)
      .map(([t, { latencies, failed }]) => ({
        t,
        requests: latencies.length,
        failed,
        max: Math.max(0, ...latencies),
        p50: latencies.length ? median(latencies) : 0,
      }))
    const before = windows.filter((w) => w.t < killAtMs - windowMs).flatMap((w) => [w.max])
    const baselineP99 = median(before)
    const after = windows.filter((w) => w.t >= killAtMs)
    const worstAfterKill = Math.max(0, ...after.slice(0, 8).map((w) => w.max))
    // Back to baseline: the first window from which every later one has its worst latency within 2x the baseline.
    const recovered = after.findIndex((_, i) => after.slice(i).every((w) => w.max <= 2 * baselineP99))
    const result: TimelineResult = {
      layer,
      killedAtMs: killAtMs,
      windowMs,
      windows,
      baselineP99,
      worstAfterKill,
      failed: windows.reduce((sum, w) => sum + w.failed, 0),
      recoveredAfterMs: recovered === -1 ? null : (after[recovered]?.t ?? killAtMs) - killAtMs + windowMs,
    }
    console.log(
      `failover ${layer}: worst ${worstAfterKill} ms after the kill (baseline worst ${baselineP99} ms per window), ${result.failed} failed, back to baseline after ${result.recoveredAfterMs} ms`,
    )
    return result
  } finally {
    await app.stop()
  }
}

async function main(): Promise<void> {
  execFileSync('npm', ['run', 'build'], { stdio: 'ignore' })
  const servers = await startCluster(3)
  const redis = await startRedis()
  const env = {
    BENCH_MEMCACHED: servers
      .slice(0, 2)
      .map((server) => `127.0.0.1:${server.port}`)
      .join(' '),
    BENCH_REDIS: `redis://127.0.0.1:${redis.port}`,
  }
  const results: CaseResult[] = []
  try {
    for (const size of onlyTimeline ? [] : sizes) {
      for (const workload of workloads) {
        results.push(...(await measureCase(workload, size, env)))
      }
    }
    // The timeline runs on three nodes; the node that holds the first session's primary is killed.
    const timelineEnv = {
      ...env,
      BENCH_MEMCACHED: servers.map((server) => `127.0.0.1:${server.port}`).join(' '),
    }
    const timeline = option('layers')
      ? []
      : [
          await failoverTimeline('session-failover/auto', timelineEnv, () =>
            (servers[0] as { kill(): Promise<void> }).kill(),
          ),
        ]
    const machine = {
      cpus: `${cpus().length} × ${cpus()[0]?.model ?? 'unknown'}`,
      memoryGiB: Math.round(totalmem() / 2 ** 30),
      node: process.version,
      date: new Date().toISOString().slice(0, 10),
      connections: CONNECTIONS,
      rounds,
      seconds,
    }
    // A partial run (some layers, workloads or sizes) must not replace the committed results.
    const full = !option('layers') && !option('workloads') && !option('sizes') && !onlyTimeline
    const output = full
      ? new URL('./results.json', import.meta.url)
      : join(tmpdir(), 'session-failover-bench.json')
    writeFileSync(output, `${JSON.stringify({ machine, results, timeline }, null, 2)}\n`)
    if (full) writeReport({ machine, results, timeline })
    else console.log(`partial run: results in ${output}`)
  } finally {
    await stopAllMemcached()
    await stopAllRedis()
  }
}

// Interrupted (Ctrl-C, a timeout's SIGTERM): the servers and apps it started go with it.
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    for (const child of runningApps) child.kill('SIGKILL')
    void Promise.all([stopAllMemcached(), stopAllRedis()]).finally(() => process.exit(130))
  })
}
await main()
