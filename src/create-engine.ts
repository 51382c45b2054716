import type { SessionBackend } from './core/backend.js'
import { RecordCodec } from './core/codec.js'
import { type Concurrency, SessionEngine } from './core/engine.js'
import { LockManager } from './core/locking.js'
import { LockingPolicy } from './core/locking-policy.js'
import { Metrics } from './core/metrics.js'
import { StickyStore } from './core/sticky.js'
import { ReplicatedStore } from './core/store.js'
import { StoreKeyring } from './core/store-keys.js'
import { ClosedError, ConfigError } from './errors.js'
import { MemcachedNode } from './nodes/memcached.js'
import { MemoryNode } from './nodes/memory.js'
import type { SessionNode } from './nodes/node.js'
import { RedisNode } from './nodes/redis.js'
import { NodeRing } from './nodes/ring.js'
import { type Config, describe, MAX_TIMER_MS, type NodeConfig, parseNodes } from './options.js'

export interface Engine {
  readonly session: SessionEngine
  readonly ring: NodeRing
  readonly metrics: Metrics
  /** Set in sticky mode. */
  readonly sticky: StickyStore | undefined
  /** Replaces the configured nodes without a restart; sessions on a removed node move as they are used. */
  setNodes(nodes: unknown): void
  /** True once close() was called. */
  readonly closed: boolean
  /** `timeout`: how long requests in flight are waited for (ms). */
  close(options?: { readonly timeout?: number }): Promise<void>
}

const DEV_WARNING =
  'session-failover: no `nodes` configured, so sessions are kept in this process only and are lost when it ' +
  'stops. This is for local development; configure `nodes` for anything else.'

/** How long close() and SIGTERM or SIGINT wait for queued sticky backups. */
const FLUSH_TIMEOUT_MS = 10_000

/** Wires nodes, ring, store and engine from a validated config. */
export function createEngine(config: Config): Engine {
  const metrics = new Metrics(config.logger)
  const common = { operationTimeoutMs: config.operationTimeoutMs, probeKey: `${config.prefix}probe` }
  const nodeFor = (spec: NodeConfig): SessionNode => {
    if (spec.kind === 'memcached') {
      return new MemcachedNode({
        ...common,
        id: spec.id,
        host: spec.host,
        port: spec.port,
        credentials: spec.credentials,
        maxValueBytes: config.maxSessionBytes,
      })
    }
    if (spec.kind === 'redis') return new RedisNode({ ...common, id: spec.id, url: spec.url })
    if (spec.kind === 'redis-sentinel') {
      const { sentinels, name, masterUrl } = spec
      return new RedisNode({
        ...common,
        id: spec.id,
        sentinel: masterUrl === undefined ? { sentinels, name } : { sentinels, name, masterUrl },
      })
    }
    return new RedisNode({ ...common, id: spec.id, cluster: spec.cluster })
  }
  let specs = config.nodes
  let nodes: SessionNode[]
  if (specs) {
    nodes = specs.map(nodeFor)
  } else {
    process.emitWarning(DEV_WARNING, { type: 'SessionFailoverWarning', code: 'ESF_NO_NODES' })
    nodes = [new MemoryNode('local')]
  }
  const ring = new NodeRing(nodes, {
    failoverNodeIds: config.failoverNodeIds,
    probeIntervalMs: config.nodeProbeIntervalMs,
    logger: config.logger,
    metrics,
  })
  // Until the nodes' next probe: sooner, no node can have been found back.
  const nodesDownRetryAfterSeconds = Math.max(1, Math.ceil(config.nodeProbeIntervalMs / 1000))
  const store = new ReplicatedStore(ring, {
    codec: new RecordCodec({ keys: new StoreKeyring(config.storeSecrets), encrypt: config.encrypt }),
    serializer: config.serializer,
    maxSessionBytes: config.maxSessionBytes,
    // Long enough for a write that was under way to have landed: its backup leaves as its primary is answered.
    repeatDeleteAfterMs: Math.max(1000, 2 * config.operationTimeoutMs),
    metrics,
    prefix: config.prefix,
    touchAfter: config.touchAfter,
    backupCheckIntervalMs: config.backupCheckIntervalMs,
    retryAfterSeconds: nodesDownRetryAfterSeconds,
    logger: config.logger,
  })

  const sticky = config.sticky
    ? new StickyStore(store, ring, {
        ...config.sticky,
        flushTimeoutMs: FLUSH_TIMEOUT_MS,
        defaultTtlSeconds: config.ttlSeconds,
        backupCheckIntervalMs: config.backupCheckIntervalMs,
        retryDelayMs: config.nodeProbeIntervalMs,
        logger: config.logger,
        metrics,
      })
    : undefined
  const backend: SessionBackend = sticky ?? store
  const locks =
    config.locking &&
    new LockManager(ring, {
      lockExpirationSeconds: config.locking.lockExpirationSeconds,
      lockTimeoutMs: config.locking.lockTimeoutMs,
      operationTimeoutMs: config.operationTimeoutMs,
      // Locks are held for one request: a second is a sensible pause before trying again.
      retryAfterSeconds: 1,
      nodesDownRetryAfterSeconds,
    })
  const concurrency: Concurrency | undefined = config.locking &&
    locks && {
      locks,
      policy: new LockingPolicy(config.locking.mode),
      store,
      prefix: config.prefix,
      lockTimeoutAction: config.locking.lockTimeoutAction,
      logger: config.logger,
    }
  const session = new SessionEngine(backend, {
    policy: {
      resave: config.resave,
      saveUninitialized: config.saveUninitialized,
      rolling: config.rolling,
      unsetDestroy: config.unsetDestroy,
    },
    defaultTtlSeconds: config.ttlSeconds,
    absoluteTimeoutMs: config.absoluteTimeoutMs,
    serializer: config.serializer,
    metrics,
    logger: config.logger,
    concurrency,
  })
  /** The first close(): every later call waits for it. */
  let closing: Promise<void> | undefined
  const live = new Map<string, { spec: NodeConfig; node: SessionNode }>(
    specs?.map((spec, index) => [spec.id, { spec, node: nodes[index] as SessionNode }]),
  )
  return {
    session,
    ring,
    metrics,
    sticky,
    get closed() {
      return closing !== undefined
    },
    setNodes(value) {
      if (closing) throw new ClosedError('session-failover was closed; its nodes cannot change')
      if (!specs) {
        throw new ConfigError(
          'setNodes() needs `nodes` configured at start-up; the development store has none',
        )
      }
      const next = parseNodes(value)
      for (const spec of next) {
        const current = live.get(spec.id)
        if (current && JSON.stringify(current.spec) !== JSON.stringify(spec)) {
          throw new ConfigError(
            `Expected node '${spec.id}' to keep its address in setNodes() (ids name where sessions live); give a changed node a new id`,
          )
        }
        if (ring.isRetired(spec.id)) {
          // Its server may still hold copies of sessions destroyed since it was removed.
          throw new ConfigError(
            `Expected a new id for a node added back after removal, got '${spec.id}' again; give the server a new id`,
          )
        }
      }
      if (next.every((spec) => config.failoverNodeIds.has(spec.id))) {
        throw new ConfigError(
          'Expected at least one node that is not in `failoverNodes`, got only failover nodes',
        )
      }
      const kept = new Set(next.map((spec) => spec.id))
      for (const id of [...live.keys()]) if (!kept.has(id)) live.delete(id)
      const nextNodes = next.map((spec) => {
        const current = live.get(spec.id)
        if (current) return current.node
        const node = nodeFor(spec)
        live.set(spec.id, { spec, node })
        return node
      })
      ring.update(nextNodes)
      specs = next
      config.logger.info({ nodes: next.map((spec) => spec.id) }, 'session-failover: nodes replaced')
    },
    // Not async: a bad timeout throws before anything is closed, so the caller may call again with a good one.
    close({ timeout = FLUSH_TIMEOUT_MS } = {}) {
      if (typeof timeout !== 'number' || !(timeout >= 0 && timeout <= MAX_TIMER_MS)) {
        throw new ConfigError(
          `Expected close()'s \`timeout\` to be milliseconds from 0 to ${MAX_TIMER_MS}, got ${describe(timeout)}`,
        )
      }
      // A second call waits for the same close: code that exits once close() resolves must not exit early.
      closing ??= (async () => {
        // Requests in flight finish first: their writes are stored (or fail) before anything is closed.
        const unfinished = await session.drain(timeout)
        if (unfinished > 0) {
          config.logger.warn(
            { requests: unfinished, timeoutMs: timeout },
            'session-failover: closing with requests still in flight after the timeout; their sessions may not be stored',
          )
        }
        await backend.close(timeout)
        await locks?.releaseAll()
        // The deletes no other instance knows of: a destroy's repeat, then what nodes that are down are owed.
        await store.repeatNow()
        await ring.settleOwed(Date.now() + timeout)
        await ring.close()
      })()
      return closing
    },
  }
}
