/**
 * Every error this library raises is a SessionFailoverError with a stable `code`, so callers can branch on
 * `err.code` rather than on message text. Errors that should reach an HTTP client carry a `status`.
 */
export class SessionFailoverError extends Error {
  readonly code: string = 'ESF_ERROR'
  /** HTTP status an error handler should answer with; express's finalhandler reads `status`. */
  readonly status: number = 500

  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = new.target.name
  }

  /** Alias read by some frameworks and error handlers. */
  get statusCode(): number {
    return this.status
  }
}

/** An option was missing or malformed; thrown once, at start-up. */
export class ConfigError extends SessionFailoverError {
  override readonly code = 'ESF_CONFIG'
}

/** No configured node could be reached: the request cannot be served without risking the session. */
export class AllNodesDownError extends SessionFailoverError {
  override readonly code = 'ESF_ALL_NODES_DOWN'
  override readonly status = 503
  /** Seconds a client may wait before retrying; sent by well-behaved error handlers as Retry-After. */
  readonly retryAfter: number
  /** Response headers for error handlers; express's finalhandler sends `err.headers`. */
  readonly headers: Readonly<Record<string, string>>

  constructor(message: string, retryAfterSeconds: number, options?: { cause?: unknown }) {
    super(message, options)
    this.retryAfter = retryAfterSeconds
    this.headers = Object.freeze({ 'Retry-After': String(retryAfterSeconds) })
  }
}

/**
 * The session's lock could not be had within `lockTimeout`: another request of the same session holds it. The
 * request is not run unlocked (that is how updates get lost); the client may retry after `retryAfter` seconds.
 */
export class LockTimeoutError extends SessionFailoverError {
  override readonly code = 'ESF_LOCK_TIMEOUT'
  override readonly status = 503
  readonly retryAfter: number
  readonly headers: Readonly<Record<string, string>>

  constructor(message: string, retryAfterSeconds: number) {
    super(message)
    this.retryAfter = retryAfterSeconds
    this.headers = Object.freeze({ 'Retry-After': String(retryAfterSeconds) })
  }
}

/** A merge kept finding the stored session changed under it (extreme write contention). */
export class ConcurrentUpdateError extends SessionFailoverError {
  override readonly code = 'ESF_CONCURRENT_UPDATE'
  override readonly status = 503
}

/** One node did not answer within `operationTimeout`. Internal: the ring turns it into a dead node. */
export class OperationTimeoutError extends SessionFailoverError {
  override readonly code = 'ESF_OPERATION_TIMEOUT'
  override readonly status = 503
}

/** One node answered with an error or its connection failed. Internal, like OperationTimeoutError. */
export class NodeOperationError extends SessionFailoverError {
  override readonly code = 'ESF_NODE_OPERATION'
  override readonly status = 503
}

/** A node answered, but refused the operation (e.g. an item too large): the node itself is healthy. */
export class NodeRejectedError extends SessionFailoverError {
  override readonly code = 'ESF_NODE_REJECTED'
}

/**
 * A session too large to store. Nothing is written: memcached deletes the stored item when a write of it is too
 * large, so the check happens before the write and the previous copy stays as it was.
 */
export class SessionTooLargeError extends SessionFailoverError {
  override readonly code = 'ESF_SESSION_TOO_LARGE'
}

/**
 * The session holds a value its serializer cannot store (a BigInt or a cycle in JSON, a function in 'v8'). Nothing
 * is written; the stored copy stays as it was.
 */
export class UnserializableSessionError extends SessionFailoverError {
  override readonly code = 'ESF_UNSERIALIZABLE'
}

/** A write that may still land on a node that failed under it (a frozen node runs it when it resumes). */
export interface LateWrite {
  readonly nodeId: string
  readonly key: string
  readonly value: Buffer
}

/**
 * A conditional write found a newer copy (or its node failing), and was not made; the caller merges instead.
 * Internal.
 */
export class StaleWriteError extends SessionFailoverError {
  override readonly code = 'ESF_STALE_WRITE'
  /** The write, when its node failed under it: once the merge stores the session elsewhere, it is deleted. */
  readonly lateWrite: LateWrite | undefined

  /** A delayed write of a session logged out meanwhile (its logout mark found): it must never be stored. */
  readonly loggedOut: boolean

  constructor(message: string, options?: ErrorOptions & { lateWrite?: LateWrite; loggedOut?: boolean }) {
    super(message, options)
    this.lateWrite = options?.lateWrite
    this.loggedOut = options?.loggedOut === true
  }
}

/** A stored blob could not be decoded: treated as no session, never shown to a client. */
export class CorruptSessionError extends SessionFailoverError {
  override readonly code: string = 'ESF_CORRUPT_SESSION'
}

/**
 * A stored copy this instance cannot read but another may: written under a store key it lacks, or in a data
 * format it cannot load (instances part-way through a change of `storeKeys`, `secret` or `serializer`). It is
 * skipped, never deleted. Internal.
 */
export class ForeignRecordError extends CorruptSessionError {
  override readonly code: string = 'ESF_FOREIGN_RECORD'
}

/** A stored copy written with a store key this instance does not have. Internal. */
export class UnknownStoreKeyError extends ForeignRecordError {
  override readonly code = 'ESF_UNKNOWN_STORE_KEY'
}

/** A stored copy whose data is in a format this instance cannot load. Internal. */
export class UnreadableFormatError extends ForeignRecordError {
  override readonly code = 'ESF_UNREADABLE_FORMAT'
}

/**
 * Asked of `req.sessionStore` what it does not do: it reads and writes the request's own session only, and in
 * sticky mode destroys only sessions this instance serves (another instance would write one back from memory).
 */
export class UnsupportedOperationError extends SessionFailoverError {
  override readonly code = 'ESF_UNSUPPORTED'
}

/** The middleware was used after close(). */
export class ClosedError extends SessionFailoverError {
  override readonly code = 'ESF_CLOSED'
  override readonly status = 503
}
