import { DemoCluster, type SessionMode } from './cluster.js'

export interface ChaosOptions {
  readonly mode: SessionMode
  /** Virtual users, each with its own cookies. */
  readonly users: number
  /** Cart writes each user makes, paced to span the whole run. */
  readonly writesPerUser: number
  /** Length of the run; the failure schedule is spread over it. */
  readonly durationMs: number
  /** Progress lines; silent when omitted. */
  readonly log?: (line: string) => void
}

export interface ChaosReport {
  readonly mode: SessionMode
  readonly requests: number
  /** Writes answered 2xx: the ones that must be in the cart at the end. */
  readonly acknowledged: number
  /** Acknowledged writes missing from a cart read back at the end. Must be 0. */
  readonly lost: number
  /** Answers other than 2xx, and requests that got no answer (in flight on an instance that was killed). */
  readonly failed: number
  /** Summed over every instance's stats(); a killed instance counts as of its last poll. */
  readonly relocations: number
  readonly takeovers: number
  readonly p50Ms: number
  readonly p99Ms: number
  /** What the schedule did, with the time of each step. */
  readonly events: readonly string[]
}

type Step = readonly [fraction: number, label: string, act: (cluster: DemoCluster) => Promise<void>]

/**
 * The failures, at fractions of the run: a node, then an instance together with another node (in sticky mode the
 * instance's sessions must then come from the copies on the nodes, one of which is gone), then a freeze. Each with
 * time for traffic to heal it before the next.
 */
const SCHEDULE: readonly Step[] = [
  [0.1, 'SIGKILL node n1', (c) => c.nodeAction(0, 'kill')],
  [0.25, 'restart n1 empty', (c) => c.nodeAction(0, 'revive')],
  [
    0.4,
    'SIGKILL instance a and node n2 together',
    async (c) => {
      await Promise.all([c.instanceAction(0, 'kill'), c.nodeAction(1, 'kill')])
    },
  ],
  [0.55, 'restart n2 empty', (c) => c.nodeAction(1, 'revive')],
  [0.6, 'restart instance a', (c) => c.instanceAction(0, 'revive')],
  [0.75, 'SIGSTOP node n3', (c) => c.nodeAction(2, 'freeze')],
  [0.85, 'SIGCONT node n3', (c) => c.nodeAction(2, 'thaw')],
]

/** A client with a cookie jar, as a browser would keep one. */
class VirtualUser {
  readonly #cookies = new Map<string, string>()

  async send(url: string, method: 'GET' | 'POST'): Promise<{ status: number; cart?: string[] }> {
    const cookie = [...this.#cookies].map(([name, value]) => `${name}=${value}`).join('; ')
    const response = await fetch(url, {
      method,
      headers: cookie ? { cookie } : {},
      signal: AbortSignal.timeout(10_000),
    })
    for (const header of response.headers.getSetCookie()) {
      const pair = header.split(';')[0] ?? ''
      const at = pair.indexOf('=')
      if (at > 0) this.#cookies.set(pair.slice(0, at), pair.slice(at + 1))
    }
    const body = (await response.json().catch(() => ({}))) as { cart?: string[] }
    return { status: response.status, cart: body.cart }
  }
}

const percentile = (sorted: readonly number[], p: number): number =>
  sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? 0

/**
 * Starts the demo cluster, lets virtual users fill their carts while nodes and an instance are killed, restarted
 * and frozen, then reads every cart back. Every process started is stopped before it returns or throws.
 */
export async function runChaos(options: ChaosOptions): Promise<ChaosReport> {
  const log = options.log ?? (() => {})
  const cluster = await DemoCluster.start({ mode: options.mode })
  const events: string[] = []
  const started = Date.now()
  const at = () => `${((Date.now() - started) / 1000).toFixed(1)} s`
  const latencies: number[] = []
  const statsByIncarnation = new Map<string, { relocations: number; takeovers: number }>()
  let requests = 0
  let failed = 0
  let polling = true

  const poll = async (): Promise<void> => {
    while (polling) {
      const state = await cluster.state()
      for (const instance of state.instances) {
        const pid = cluster.instances.find((i) => i.settings.name === instance.name)?.pid
        if (instance.stats && pid) statsByIncarnation.set(`${instance.name}/${pid}`, instance.stats)
      }
      await new Promise((resolve) => setTimeout(resolve, 250))
    }
  }

  const user = async (index: number): Promise<{ client: VirtualUser; acknowledged: string[] }> => {
    const client = new VirtualUser()
    const acknowledged: string[] = []
    const pace = options.durationMs / options.writesPerUser
    // Users start spread over one pace, so requests do not arrive in waves.
    await new Promise((resolve) => setTimeout(resolve, (pace * index) / options.users))
    for (let write = 0; write < options.writesPerUser; write++) {
      const item = `u${index}-${write}`
      const sent = Date.now()
      requests++
      try {
        const { status } = await client.send(`${cluster.url}/cart/${item}`, 'POST')
        latencies.push(Date.now() - sent)
        if (status >= 200 && status < 300) acknowledged.push(item)
        else failed++
      } catch {
        failed++
      }
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, pace - (Date.now() - sent))))
    }
    return { client, acknowledged }
  }

  try {
    const poller = poll()
    const schedule = (async () => {
      for (const [fraction, label, act] of SCHEDULE) {
        await new Promise((resolve) =>
          setTimeout(resolve, Math.max(0, started + fraction * options.durationMs - Date.now())),
        )
        await act(cluster)
        events.push(`${at()}  ${label}`)
        log(`  ${at()}  ${label}`)
      }
    })()
    const users = await Promise.all(Array.from({ length: options.users }, (_, index) => user(index)))
    await schedule
    // Every cart read back through the balancer, with the cookies its user ended with.
    let lost = 0
    for (const { client, acknowledged } of users) {
      const { status, cart = [] } = await client.send(`${cluster.url}/cart`, 'GET')
      const kept = new Set(cart)
      const missing = acknowledged.filter((item) => !kept.has(item))
      if (status !== 200 || missing.length > 0) {
        log(
          `  lost: ${missing.length} of ${acknowledged.length} (read back answered ${status}): ${missing.join(' ')}`,
        )
      }
      lost += status === 200 ? missing.length : acknowledged.length
    }
    polling = false
    await poller
    const sorted = latencies.sort((a, b) => a - b)
    const totals = [...statsByIncarnation.values()]
    return {
      mode: options.mode,
      requests,
      acknowledged: users.reduce((sum, u) => sum + u.acknowledged.length, 0),
      lost,
      failed,
      relocations: totals.reduce((sum, s) => sum + s.relocations, 0),
      takeovers: totals.reduce((sum, s) => sum + s.takeovers, 0),
      p50Ms: percentile(sorted, 0.5),
      p99Ms: percentile(sorted, 0.99),
      events,
    }
  } finally {
    polling = false
    await cluster.stop()
  }
}
