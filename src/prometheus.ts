import { Counter, Gauge, Histogram, type Registry, register } from 'prom-client'
import type { SessionCounters } from './core/counters.js'
import { LATENCY_BUCKETS, type LatencyName } from './core/metrics.js'
import { ConfigError } from './errors.js'
import { METRICS_SOURCE, type MetricsSource } from './operator.js'
import { describe } from './options.js'

export interface PrometheusOptions {
  /** Where the metrics are registered. Default: prom-client's global registry. */
  readonly registry?: Registry
  /** Prefix of every metric name. Default `session_failover_`. */
  readonly prefix?: string
}

/** A middleware (`sessionFailover(...)`) or a Fastify app's `app.sessionFailover`. */
export interface MetricsProvider {
  readonly [METRICS_SOURCE]: MetricsSource
}

/** Counters read from stats() at scrape time: name, help, and the SessionCounters field with its labels. */
const COUNTERS: readonly {
  readonly name: string
  readonly help: string
  readonly labelName?: string
  readonly series: readonly { readonly label?: string; readonly field: keyof SessionCounters }[]
}[] = [
  {
    name: 'requests_total',
    help: 'Requests, by whether they presented a session that was found',
    labelName: 'session',
    series: [
      { label: 'found', field: 'requestsWithSession' },
      { label: 'new', field: 'requestsWithoutSession' },
    ],
  },
  {
    name: 'writes_skipped_total',
    help: 'Requests whose session was unchanged, so nothing was written',
    series: [{ field: 'writesSkipped' }],
  },
  {
    name: 'writes_total',
    help: 'Session copies written, by copy',
    labelName: 'copy',
    series: [
      { label: 'primary', field: 'primaryWrites' },
      { label: 'backup', field: 'backupWrites' },
    ],
  },
  {
    name: 'write_failures_total',
    help: 'Writes of a session copy that failed, by copy',
    labelName: 'copy',
    series: [
      { label: 'primary', field: 'primaryWriteFailures' },
      { label: 'backup', field: 'backupWriteFailures' },
    ],
  },
  {
    name: 'relocations_total',
    help: 'Sessions moved off a dead node',
    series: [{ field: 'relocations' }],
  },
  {
    name: 'takeovers_total',
    help: 'Sticky sessions taken over from another instance',
    series: [{ field: 'takeovers' }],
  },
  {
    name: 'restores_total',
    help: 'Sessions restored from their backup onto a primary that lost them',
    series: [{ field: 'restores' }],
  },
  { name: 'locks_acquired_total', help: 'Session locks acquired', series: [{ field: 'locksAcquired' }] },
  {
    name: 'lock_waits_total',
    help: 'Session locks acquired after waiting for another request',
    series: [{ field: 'lockWaits' }],
  },
  {
    name: 'lock_timeouts_total',
    help: 'Session locks not acquired in time',
    series: [{ field: 'lockTimeouts' }],
  },
  { name: 'merges_total', help: 'Writes merged into the stored session', series: [{ field: 'merges' }] },
  {
    name: 'merge_conflicts_total',
    help: 'Keys changed by two requests at once (last writer won)',
    series: [{ field: 'mergeConflicts' }],
  },
  {
    name: 'corrupt_sessions_total',
    help: 'Stored copies that failed their integrity check, decryption or deserialization',
    series: [{ field: 'corruptSessions' }],
  },
  {
    name: 'foreign_records_total',
    help: 'Stored copies skipped because another instance may read them (another key or serializer)',
    series: [{ field: 'foreignRecords' }],
  },
  {
    name: 'known_absent_hits_total',
    help: 'Requests for an expired or destroyed id answered without reading any node',
    series: [{ field: 'knownAbsentHits' }],
  },
  {
    name: 'moves_followed_total',
    help: 'Requests presenting the old id of a session this instance moved, loaded under its new id',
    series: [{ field: 'movesFollowed' }],
  },
]

const HISTOGRAMS: Readonly<Record<LatencyName, { readonly name: string; readonly help: string }>> = {
  load: { name: 'load_duration_seconds', help: 'Time to load a session (from memory or the nodes)' },
  save: { name: 'save_duration_seconds', help: 'Time to store a modified session (both copies)' },
  lockWait: { name: 'lock_wait_duration_seconds', help: 'Time to acquire a session lock' },
  serialize: {
    name: 'serialize_duration_seconds',
    help: 'Time to serialize a session at the end of a request',
  },
}

/**
 * Registers the session layer's metrics on a prom-client registry: counters and node figures are read at scrape
 * time, latencies are observed as they happen (from this call on). Returns a function that unregisters them.
 */
export function registerSessionMetrics(
  provider: MetricsProvider,
  options: PrometheusOptions = {},
): () => void {
  const source = provider[METRICS_SOURCE]
  const registry = options.registry ?? register
  const prefix = options.prefix ?? 'session_failover_'
  if (typeof prefix !== 'string' || !/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(prefix)) {
    throw new ConfigError(
      `Expected \`prefix\` to start a Prometheus metric name (letters, digits, '_' and ':', no digit first), got ${describe(prefix)}`,
    )
  }
  const names = [
    ...COUNTERS.map((counter) => counter.name),
    'node_up',
    'node_operations_total',
    'node_errors_total',
    ...Object.values(HISTOGRAMS).map((histogram) => histogram.name),
  ].map((name) => prefix + name)
  // All or nothing: a clash (a second middleware with the same prefix) registers none of them.
  const taken = names.find((name) => registry.getSingleMetric(name) !== undefined)
  if (taken) {
    throw new ConfigError(
      `Expected the metric ${taken} to be free on this registry, got one already registered: give each middleware its own \`prefix\``,
    )
  }
  const registers = [registry]

  for (const counter of COUNTERS) {
    new Counter({
      name: prefix + counter.name,
      help: counter.help,
      labelNames: counter.labelName ? [counter.labelName] : [],
      registers,
      collect() {
        this.reset()
        for (const { label, field } of counter.series) {
          const value = source.metrics.counters[field]
          if (counter.labelName && label) this.inc({ [counter.labelName]: label }, value)
          else this.inc(value)
        }
      },
    })
  }

  new Gauge({
    name: `${prefix}node_up`,
    help: 'Whether the node is alive (1) or marked dead (0)',
    labelNames: ['node'],
    registers,
    collect() {
      this.reset()
      for (const node of source.nodes()) this.set({ node: node.id }, node.alive ? 1 : 0)
    },
  })
  for (const [name, help, field] of [
    ['node_operations_total', 'Operations sent to the node', 'ops'],
    ['node_errors_total', 'Operations on the node that failed', 'errors'],
  ] as const) {
    new Counter({
      name: prefix + name,
      help,
      labelNames: ['node'],
      registers,
      collect() {
        this.reset()
        for (const node of source.nodes()) this.inc({ node: node.id }, node[field])
      },
    })
  }

  const histograms = new Map<LatencyName, Histogram>()
  for (const [latency, { name, help }] of Object.entries(HISTOGRAMS) as [
    LatencyName,
    (typeof HISTOGRAMS)['load'],
  ][]) {
    histograms.set(
      latency,
      new Histogram({ name: prefix + name, help, buckets: [...LATENCY_BUCKETS], registers }),
    )
  }
  const stopObserving = source.metrics.onObservation((latency, seconds) =>
    histograms.get(latency)?.observe(seconds),
  )

  // What this call registered: a later call that unregisters removes these objects only, and only once, never
  // the metrics another registration made under the same names since.
  const mine = names.map((name) => [name, registry.getSingleMetric(name)] as const)
  let registered = true
  return () => {
    if (!registered) return
    registered = false
    stopObserving()
    for (const [name, metric] of mine)
      if (registry.getSingleMetric(name) === metric) registry.removeSingleMetric(name)
  }
}
