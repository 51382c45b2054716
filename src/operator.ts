import type { SessionCounters } from './core/counters.js'
import type { LatencyName, LatencySummary, Metrics, SessionEventName, SessionEvents } from './core/metrics.js'
import type { Engine } from './create-engine.js'
import type { NodeHealth } from './nodes/ring.js'
import type { NodeSpec } from './options.js'

/** What stats() returns: every counter, latency summaries (seconds) and per-node figures, as of the call. */
export interface SessionStats extends Readonly<SessionCounters> {
  readonly latency: Readonly<Record<LatencyName, LatencySummary>>
  readonly nodes: readonly NodeHealth[]
}

/** What health() returns: ready while at least one node is alive. */
export interface SessionHealth {
  readonly ready: boolean
  readonly nodes: readonly NodeHealth[]
}

/** Where the Prometheus bridge finds a middleware's (or plugin's) metrics; not part of the public API. */
export const METRICS_SOURCE = Symbol.for('session-failover.metrics')

export interface MetricsSource {
  readonly metrics: Metrics
  nodes(): readonly NodeHealth[]
}

/** The operator's side of a middleware or plugin: the same in both adapters. */
export interface SessionOperations {
  /**
   * Waits for requests in flight (up to `timeout` ms, default 10000), writes queued backups (sticky
   * `backupAsync`), releases the locks requests still hold, does the deletes it still owes (a destroy's repeat,
   * those owed to nodes that are down), then closes every node connection. Call on shutdown (SIGTERM) after the
   * HTTP server stopped accepting. Later requests get ClosedError (503).
   */
  close(options?: { readonly timeout?: number }): Promise<void>
  health(): SessionHealth
  stats(): SessionStats
  /** Sticky mode: sessions and bytes held in memory, and backups not yet written; undefined otherwise. */
  localStatus(): { sessions: number; bytes: number; pendingBackups: number } | undefined
  /**
   * Replaces the nodes without a restart (same forms as the `nodes` option). A node that stays keeps its id and
   * address; sessions on a removed node move to the others, from their backups, as they are used.
   */
  setNodes(nodes: string | readonly NodeSpec[]): void
  /**
   * Destroys a session by its id, both copies on every node: an admin's "log this user out", a user's "log out my
   * other devices". An id this store did not issue names no session: nothing to do. In sticky mode only a session
   * this instance serves (UnsupportedOperationError otherwise: its instance would write it back from memory).
   */
  destroySession(id: string): Promise<void>
  on<K extends SessionEventName>(event: K, listener: (payload: SessionEvents[K]) => unknown): void
  off<K extends SessionEventName>(event: K, listener: (payload: SessionEvents[K]) => unknown): void
  readonly [METRICS_SOURCE]: MetricsSource
}

export function operationsOf(
  engine: Engine,
  close: (options?: { readonly timeout?: number }) => Promise<void>,
): SessionOperations {
  const { metrics, ring } = engine
  return {
    close,
    health: () => {
      ring.askUnasked()
      const nodes = ring.health()
      return { ready: !engine.closed && nodes.some((node) => node.alive), nodes }
    },
    stats: () => ({
      ...metrics.counters,
      latency: {
        load: metrics.latency.load.summary(),
        save: metrics.latency.save.summary(),
        lockWait: metrics.latency.lockWait.summary(),
        serialize: metrics.latency.serialize.summary(),
      },
      nodes: ring.health(),
    }),
    localStatus: () =>
      engine.sticky && { ...engine.sticky.localSize, pendingBackups: engine.sticky.pendingBackups },
    setNodes: (nodes) => engine.setNodes(nodes),
    destroySession: async (id) => {
      if (typeof id !== 'string') {
        throw new TypeError(`destroySession(id) takes a session id (a string), got ${typeof id}`)
      }
      await engine.session.destroyById(id)
    },
    on: (event, listener) => metrics.on(event, listener),
    off: (event, listener) => metrics.off(event, listener),
    [METRICS_SOURCE]: { metrics, nodes: () => ring.health() },
  }
}
