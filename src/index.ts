export type { Session, SessionData } from 'express-session'
export type { SessionCounters } from './core/counters.js'
export type { LockingMode } from './core/locking-policy.js'
export type {
  LatencyName,
  LatencySummary,
  SessionEventName,
  SessionEvents,
} from './core/metrics.js'
export type { CustomSerializer } from './core/serializer.js'
export {
  AllNodesDownError,
  ClosedError,
  ConcurrentUpdateError,
  ConfigError,
  CorruptSessionError,
  LockTimeoutError,
  NodeOperationError,
  NodeRejectedError,
  OperationTimeoutError,
  SessionFailoverError,
  SessionTooLargeError,
  UnserializableSessionError,
  UnsupportedOperationError,
} from './errors.js'
export { type SessionFailoverMiddleware, sessionFailover } from './express/middleware.js'
export type { Logger } from './logger.js'
export type { NodeHealth } from './nodes/ring.js'
export type { SessionHealth, SessionOperations, SessionStats } from './operator.js'
export type { NodeSpec, SessionFailoverOptions } from './options.js'
export { type ParsedSessionId, parseSessionId } from './session-id.js'
