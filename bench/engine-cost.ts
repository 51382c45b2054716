// The library's own CPU per request, without HTTP: the session engine driven directly against two real
// memcached servers, 50 sessions at once, each loop one request after another (open, change, commit, answer).
// Through HTTP, Express, Node's HTTP code and the load generator share the machine and move every figure by
// 15-25 % run to run; here only the library and its node connections run in the process, so a difference of a
// few µs between two modes, or two builds, shows. Modes run in a rotating order; the medians of the rounds.
//   npx tsx bench/engine-cost.ts                 (write and read, every mode, small sessions)
//   npx tsx bench/engine-cost.ts --large --rounds=7 --cycles=2000
//   npx tsx bench/engine-cost.ts --dist=/path/to/another/checkout/dist   (A/B against another build)
import { execFileSync } from 'node:child_process'
import { isAbsolute, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { nodesOption, startCluster, stopAllMemcached } from '../test/support/memcached.js'

const MODES = ['sticky', 'none', 'auto', 'merge'] as const
type Mode = (typeof MODES)[number]
const SESSIONS = 50

const flags = process.argv.slice(2)
const flag = (name: string): string | undefined =>
  flags.find((arg) => arg.startsWith(`--${name}=`))?.slice(name.length + 3)
const rounds = Number(flag('rounds') ?? 5)
const cycles = Number(flag('cycles') ?? 1500)
const payload = 'x'.repeat(flags.includes('--large') ? 20_000 : 150)
const given = flag('dist')
if (!given) execFileSync('npm', ['run', 'build'], { stdio: 'ignore' })
const dist = given
  ? isAbsolute(given)
    ? given
    : resolve(given)
  : new URL('../dist', import.meta.url).pathname
const load = async <T>(name: string): Promise<T> => (await import(pathToFileURL(`${dist}/${name}`).href)) as T
const { createEngine } = await load<typeof import('../src/create-engine.js')>('create-engine.js')
const { parseOptions } = await load<typeof import('../src/options.js')>('options.js')

type Engine = ReturnType<typeof createEngine>
interface Data {
  count: number
  payload: string
}
const quiet = { debug() {}, info() {}, warn() {}, error: console.error }
const cookie = { path: '/', httpOnly: true, originalMaxAge: null }

/** One request of a session: opened (locked when the mode says so), changed or not, committed and answered. */
async function request(engine: Engine, id: string, write: boolean): Promise<string> {
  const session = engine.session
  const facts = {
    method: write ? 'POST' : 'GET',
    path: write ? '/write' : '/read',
    raw: undefined,
    route: undefined,
  }
  const opened = await session.open({ id, resign: false }, facts)
  const data = opened.content?.data as Data | undefined
  const next = { count: (data?.count ?? 0) + (write ? 1 : 0), payload: data?.payload ?? payload }
  const snapshot = session.snapshot(next, opened.content?.cookie ?? cookie)
  if (!session.commitAtOnce(opened.state, snapshot, facts)) {
    await session.commit(opened.state, snapshot)
    await session.answered(opened.state, facts)
  }
  return opened.state.id
}

/** µs of this process's CPU per request, and requests per second, for `cycles` requests on every session. */
async function measure(mode: Mode, nodes: string, write: boolean): Promise<{ cpu: number; rate: number }> {
  const engine = createEngine(
    parseOptions({
      secret: 'engine cost, a secret long enough for anything',
      nodes,
      logger: quiet,
      ...(mode === 'sticky' ? { sticky: true, route: 'bench' } : { lockingMode: mode }),
    }),
  )
  try {
    const ids: string[] = []
    for (let i = 0; i < SESSIONS; i++) {
      const opened = await engine.session.open(undefined)
      await engine.session.commit(opened.state, engine.session.snapshot({ count: 0, payload }, cookie))
      await engine.session.finish(opened.state)
      ids.push(opened.state.id)
    }
    const loop = async (i: number, count: number) => {
      for (let k = 0; k < count; k++) ids[i] = await request(engine, ids[i] as string, write)
    }
    // Warm-up: optimized code, 'auto' has learned its routes, the connections know their item size.
    await Promise.all(ids.map((_, i) => loop(i, 200)))
    const before = process.cpuUsage()
    const start = performance.now()
    await Promise.all(ids.map((_, i) => loop(i, cycles)))
    const used = process.cpuUsage(before)
    const seconds = (performance.now() - start) / 1000
    const requests = SESSIONS * cycles
    return { cpu: (used.user + used.system) / requests, rate: requests / seconds }
  } finally {
    await engine.close({ timeout: 1000 })
  }
}

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)] as number
}

const servers = await startCluster(2)
try {
  const nodes = nodesOption(servers)
  console.log(
    `library CPU per request, ${SESSIONS} sessions, ${payload.length} B payload, ${rounds} rounds of ${cycles} requests per session, ${dist}`,
  )
  for (const write of [true, false]) {
    const cpu = new Map<Mode, number[]>(MODES.map((mode) => [mode, []]))
    const rate = new Map<Mode, number[]>(MODES.map((mode) => [mode, []]))
    for (let round = 0; round < rounds; round++) {
      for (let i = 0; i < MODES.length; i++) {
        const mode = MODES[(round + i) % MODES.length] as Mode
        const result = await measure(mode, nodes, write)
        cpu.get(mode)?.push(result.cpu)
        rate.get(mode)?.push(result.rate)
      }
    }
    const none = median(cpu.get('none') ?? [])
    console.log(write ? '\nwrite every request' : '\nread only')
    for (const mode of MODES) {
      const mine = cpu.get(mode) ?? []
      console.log(
        `  ${mode.padEnd(7)} ${median(mine).toFixed(1).padStart(6)} µs/req  (${(median(mine) - none >= 0 ? '+' : '') + (median(mine) - none).toFixed(1)} vs 'none'; rounds ${mine.map((v) => v.toFixed(0)).join(' ')})  ${median(rate.get(mode) ?? []).toFixed(0)} req/s`,
      )
    }
  }
} finally {
  await stopAllMemcached()
}
