import type { SessionBackend } from './core/backend.js'
import { RecordCodec } from './core/codec.js'
import { newCounters } from './core/counters.js'
import { type Concurrency, SessionEngine } from './core/engine.js'
import { LockManager } from './core/locking.js'
import { LockingPolicy } from './core/locking-policy.js'
import { StickyStore } from './core/sticky.js'
import { ReplicatedStore } from './core/store.js'
import { StoreKeyring } from './core/store-keys.js'
import { MemcachedNode } from './nodes/memcached.js'
import { MemoryNode } from './nodes/memory.js'
import type { SessionNode } from './nodes/node.js'
import { RedisNode } from './nodes/redis.js'
import { NodeRing } from './nodes/ring.js'
import type { Config } from './options.js'

export interface Engine {
  readonly session: SessionEngine
  readonly ring: NodeRing
  /** Set in sticky mode. */
  readonly sticky: StickyStore | undefined
  close(): Promise<void>
}

const DEV_WARNING =
  'session-failover: no `nodes` configured, so sessions are kept in this process only and are lost when it ' +
  'stops. This is for local development; configure `nodes` for anything else.'

/** How long close() and SIGTERM wait for queued sticky backups. */
const FLUSH_TIMEOUT_MS = 10_000

/** Wires nodes, ring, store and engine from a validated config. */
export function createEngine(config: Config): Engine {
  let nodes: SessionNode[]
  if (config.nodes) {
    const common = { operationTimeoutMs: config.operationTimeoutMs, probeKey: `${config.prefix}probe` }
    nodes = config.nodes.map((spec): SessionNode => {
      if (spec.kind === 'memcached')
        return new MemcachedNode({
          ...common,
          id: spec.id,
          host: spec.host,
          port: spec.port,
          credentials: spec.credentials,
        })
      if (spec.kind === 'redis') return new RedisNode({ ...common, id: spec.id, url: spec.url })
      if (spec.kind === 'redis-sentinel') {
        return new RedisNode({
          ...common,
          id: spec.id,
          sentinel: { sentinels: spec.sentinels, name: spec.name },
        })
      }
      return new RedisNode({ ...common, id: spec.id, cluster: spec.cluster })
    })
  } else {
    process.emitWarning(DEV_WARNING, { type: 'SessionFailoverWarning', code: 'ESF_NO_NODES' })
    nodes = [new MemoryNode('local')]
  }
  const ring = new NodeRing(nodes, {
    failoverNodeIds: config.failoverNodeIds,
    probeIntervalMs: config.nodeProbeIntervalMs,
    logger: config.logger,
  })
  const counters = newCounters()
  const store = new ReplicatedStore(ring, {
    codec: new RecordCodec({ keys: new StoreKeyring(config.storeSecrets), encrypt: config.encrypt }),
    serializer: config.serializer,
    maxSessionBytes: config.maxSessionBytes,
    counters,
    prefix: config.prefix,
    touchAfter: config.touchAfter,
    backupCheckIntervalMs: config.backupCheckIntervalMs,
    retryAfterSeconds: Math.max(1, Math.ceil(config.nodeProbeIntervalMs / 1000)),
    logger: config.logger,
  })

  const sticky = config.sticky
    ? new StickyStore(store, ring, {
        ...config.sticky,
        flushTimeoutMs: FLUSH_TIMEOUT_MS,
        defaultTtlSeconds: config.ttlSeconds,
        retryDelayMs: config.nodeProbeIntervalMs,
        logger: config.logger,
      })
    : undefined
  const backend: SessionBackend = sticky ?? store
  const concurrency: Concurrency | undefined = config.locking && {
    locks: new LockManager(ring, {
      lockExpirationSeconds: config.locking.lockExpirationSeconds,
      lockTimeoutMs: config.locking.lockTimeoutMs,
      operationTimeoutMs: config.operationTimeoutMs,
      // Locks are held for one request: a second is a sensible pause before trying again.
      retryAfterSeconds: 1,
    }),
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
    counters,
    logger: config.logger,
    concurrency,
  })
  return {
    session,
    ring,
    sticky,
    async close() {
      await backend.close()
      await ring.close()
    },
  }
}
