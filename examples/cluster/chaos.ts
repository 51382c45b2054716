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
  /** Items in a cart read back that its user never sent (another user's session). Must be 0. */
  readonly foreign: number
  /** Requests not acknowledged, by cause: an HTTP status, or 'no answer'. */
  readonly failures: Readonly<Record<string, number>>
  /**
   * During the run (not the read-back), summed over every instance's stats(); a killed instance counts as of its
   * last poll.
   */
  readonly relocations: number
  readonly takeovers: number
  /** Over every request, failed ones included (a request with no answer counts its time until it gave up). */
  readonly p50Ms: number
  readonly p99Ms: number
  /** What the schedule did, with the time of each step. */
  readonly events: readonly string[]
  /** When the last step ended and when the last write was sent (ms from the start): the failures hit traffic. */
  readonly scheduleEndedAtMs: number
  readonly lastWriteAtMs: number
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)))

type Step = readonly [
  fraction: number,
  label: string,
  act: (cluster: DemoCluster, durationMs: number) => Promise<void>,
]

/**
 * The failures, at fractions of the run: a node; then an instance together with another node (in sticky mode the
 * instance's sessions must then come from the copies on the nodes, one of which is gone); then a freeze. Each
 * with time for traffic to heal it before the next.
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
  [
    0.7,
    'SIGSTOP node n3, SIGCONT after a tenth of the run',
    async (c, durationMs) => {
      await c.nodeAction(2, 'freeze')
      await sleep(durationMs / 10)
      await c.nodeAction(2, 'thaw')
    },
  ],
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
 * and frozen, then restarts every instance (so nothing is answered from an instance's memory) and reads every
 * cart back. Every process started is stopped before it returns or throws.
 */
export async function runChaos(options: ChaosOptions): Promise<ChaosReport> {
  const log = options.log ?? (() => {})
  const cluster = await DemoCluster.start({ mode: options.mode })
  const events: string[] = []
  const started = Date.now()
  const since = () => Date.now() - started
  const latencies: number[] = []
  const failures: Record<string, number> = {}
  const statsByIncarnation = new Map<string, { relocations: number; takeovers: number }>()
  let requests = 0
  let lastWriteAtMs = 0
  let scheduleEndedAtMs = 0
  let polling = true

  const collectStats = async (): Promise<void> => {
    for (const instance of (await cluster.state()).instances) {
      if (instance.stats && instance.pid)
        statsByIncarnation.set(`${instance.name}/${instance.pid}`, instance.stats)
    }
  }
  const poll = async (): Promise<void> => {
    while (polling) {
      await collectStats()
      await sleep(250)
    }
  }

  const user = async (
    index: number,
  ): Promise<{ client: VirtualUser; sent: string[]; acknowledged: string[] }> => {
    const client = new VirtualUser()
    const sent: string[] = []
    const acknowledged: string[] = []
    const pace = options.durationMs / options.writesPerUser
    // Users start spread over one pace, so requests do not arrive in waves.
    await sleep((pace * index) / options.users)
    for (let write = 0; write < options.writesPerUser; write++) {
      const item = `u${index}-${write}`
      const sentAt = Date.now()
      requests++
      sent.push(item)
      lastWriteAtMs = since()
      try {
        const { status } = await client.send(`${cluster.url}/cart/${item}`, 'POST')
        if (status >= 200 && status < 300) acknowledged.push(item)
        else failures[status] = (failures[status] ?? 0) + 1
      } catch {
        failures['no answer'] = (failures['no answer'] ?? 0) + 1
      }
      latencies.push(Date.now() - sentAt)
      await sleep(pace - (Date.now() - sentAt))
    }
    return { client, sent, acknowledged }
  }

  const runSchedule = async (): Promise<void> => {
    for (const [fraction, label, act] of SCHEDULE) {
      await sleep(started + fraction * options.durationMs - Date.now())
      const at = since()
      await act(cluster, options.durationMs)
      events.push(`${(at / 1000).toFixed(1)} s  ${label}`)
      log(`  ${(at / 1000).toFixed(1)} s  ${label}`)
    }
    scheduleEndedAtMs = since()
  }

  try {
    const poller = poll()
    // Settled at once into a value, so a failing step is reported after the users finish, never unhandled.
    const schedule = runSchedule().then(
      () => undefined,
      (error: unknown) => ({ error }),
    )
    const users = await Promise.all(Array.from({ length: options.users }, (_, index) => user(index)))
    const scheduleFailure = await schedule
    if (scheduleFailure) throw scheduleFailure.error
    polling = false
    await poller
    // The counters of the run itself: the read-back below adds a takeover per sticky session.
    await collectStats()
    const totals = [...statsByIncarnation.values()]

    // Every instance restarted: in sticky mode a cart is then read from the nodes, not from the memory of the
    // instance that wrote it, so a write acknowledged without its copies stored would show.
    for (const [index] of cluster.instances.entries()) {
      await cluster.instanceAction(index, 'kill')
      await cluster.instanceAction(index, 'revive')
    }
    log('  every instance restarted; reading every cart back')
    let lost = 0
    let foreign = 0
    for (const { client, sent, acknowledged } of users) {
      const { status, cart = [] } = await client.send(`${cluster.url}/cart`, 'GET')
      const kept = new Set(cart)
      const missing = status === 200 ? acknowledged.filter((item) => !kept.has(item)) : acknowledged
      const mine = new Set(sent)
      const strangers = cart.filter((item) => !mine.has(item))
      if (missing.length > 0 || strangers.length > 0) {
        log(
          `  read back answered ${status}: missing ${missing.join(' ') || 'none'}; foreign ${strangers.join(' ') || 'none'}`,
        )
      }
      lost += missing.length
      foreign += strangers.length
    }
    const sorted = latencies.sort((a, b) => a - b)
    return {
      mode: options.mode,
      requests,
      acknowledged: users.reduce((sum, u) => sum + u.acknowledged.length, 0),
      lost,
      foreign,
      failures,
      relocations: totals.reduce((sum, s) => sum + s.relocations, 0),
      takeovers: totals.reduce((sum, s) => sum + s.takeovers, 0),
      p50Ms: percentile(sorted, 0.5),
      p99Ms: percentile(sorted, 0.99),
      events,
      scheduleEndedAtMs,
      lastWriteAtMs,
    }
  } finally {
    polling = false
    await cluster.stop()
  }
}
