export type { SessionData } from 'express-session'
export {
  AllNodesDownError,
  ClosedError,
  ConfigError,
  CorruptSessionError,
  NodeOperationError,
  NodeRejectedError,
  OperationTimeoutError,
  SessionFailoverError,
  SessionTooLargeError,
} from './errors.js'
export { type SessionFailoverMiddleware, sessionFailover } from './express/middleware.js'
export type { Logger } from './logger.js'
export type { NodeHealth } from './nodes/ring.js'
export type { NodeSpec, SessionFailoverOptions } from './options.js'
export { type ParsedSessionId, parseSessionId } from './session-id.js'
