import type { Socket } from 'node:net'
import memjs from 'memjs'
import { NodeOperationError, NodeRejectedError } from '../errors.js'
import { memcachedExpiry, type SessionNode } from './node.js'
import { withTimeout } from './timeout.js'

export interface MemcachedNodeConfig {
  readonly id: string
  readonly host: string
  readonly port: number
  readonly operationTimeoutMs: number
  readonly probeKey: string
}

const silentMemjsLogger = { log: (): void => {} }

/**
 * One memjs client talking to exactly one memcached server. memjs's own multi-server hashing and `failover`
 * are never used: which node holds a session is decided by the ring, from the session id.
 */
export class MemcachedNode implements SessionNode {
  readonly id: string
  readonly address: string
  readonly #client: memjs.Client
  readonly #server: memjs.Server
  readonly #timeoutMs: number
  readonly #probeKey: string
  #closed = false

  constructor(config: MemcachedNodeConfig) {
    this.id = config.id
    this.address = `memcached ${config.host}:${config.port}`
    this.#timeoutMs = config.operationTimeoutMs
    this.#probeKey = config.probeKey
    const seconds = config.operationTimeoutMs / 1000
    this.#server = new memjs.Server(config.host, config.port, undefined, undefined, {
      timeout: seconds,
      conntimeout: seconds,
      keepAlive: true,
      keepAliveDelay: 10,
    })
    containMemjsFailures(this.#server)
    // retries: 1 means one attempt; memjs retries would multiply the time a dead node costs a request.
    this.#client = new memjs.Client([this.#server], { retries: 1, logger: silentMemjsLogger, expires: 0 })
  }

  get(key: string): Promise<Buffer | null> {
    return this.#run('get', () => this.#client.get(key).then((result) => result.value))
  }

  async set(key: string, value: Buffer, ttlSeconds: number): Promise<void> {
    await this.#run('set', () => this.#client.set(key, value, { expires: memcachedExpiry(ttlSeconds) }))
  }

  add(key: string, value: Buffer, ttlSeconds: number): Promise<boolean> {
    return this.#run('add', () => this.#client.add(key, value, { expires: memcachedExpiry(ttlSeconds) }))
  }

  delete(key: string): Promise<boolean> {
    return this.#run('delete', () => this.#client.delete(key))
  }

  touch(key: string, ttlSeconds: number): Promise<boolean> {
    return this.#run('touch', () => this.#client.touch(key, memcachedExpiry(ttlSeconds)))
  }

  async ping(): Promise<void> {
    await this.get(this.#probeKey)
  }

  async close(): Promise<void> {
    this.#closed = true
    this.#server.error(new Error('node closed'))
  }

  #run<T>(operation: string, start: () => Promise<T>): Promise<T> {
    // memjs would silently reconnect; a closed node must stay closed.
    if (this.#closed) return Promise.reject(new NodeOperationError(`${this.address} is closed`))
    const wrapped = start().catch((cause: unknown) => {
      const message = `${this.address} failed ${operation}: ${describeCause(cause)}`
      // memjs prefixes errors that carry a server reply status with 'MemJS'; anything else is the connection.
      if (cause instanceof Error && cause.message.startsWith('MemJS '))
        throw new NodeRejectedError(message, { cause })
      throw new NodeOperationError(message, { cause })
    })
    return withTimeout(
      wrapped,
      this.#timeoutMs,
      () => `${this.address} (${operation})`,
      // A request that timed out may never be answered; failing the connection releases every callback
      // memjs holds for it and the next operation reconnects.
      () => this.#server.error(new Error('operation timed out')),
    )
  }
}

function describeCause(cause: unknown): string {
  if (cause instanceof Error) return cause.message
  return String(cause)
}

/** A binary-protocol response starts with this byte; anything else means the stream is out of step. */
const RESPONSE_MAGIC = 0x81
/** memcached items are at most 1 MiB by default; a reply buffer far past that is a misparse, not data. */
const MAX_BUFFERED_REPLY = 8 * 1024 * 1024

type MemjsServerInternals = memjs.Server & { _socket?: Socket; responseBuffer: Buffer }

/**
 * memjs's failure handling has gaps that can hang or crash a process; each is closed here, per server instance:
 * - a server closing the connection without a socket error (a killed or restarted memcached) leaves callbacks
 *   pending forever: the close now fails them;
 * - error() keeps the partial reply buffered, so the next connection's replies are parsed behind stale bytes
 *   and the node never recovers: the buffer is cleared with every connection failure;
 * - a malformed reply is parsed as a header claiming any length, or throws inside the 'data' listener (an
 *   uncaught exception): it now fails the connection instead.
 */
function containMemjsFailures(server: memjs.Server): void {
  const internals = server as MemjsServerInternals
  const failConnection = server.error.bind(server)
  server.error = (error: Error): void => {
    internals.responseBuffer = Buffer.alloc(0)
    failConnection(error)
    internals.responseBuffer = Buffer.alloc(0)
  }

  const handleResponse = server.responseHandler.bind(server)
  server.responseHandler = (data: Buffer): void => {
    try {
      handleResponse(data)
    } catch (error) {
      server.error(error instanceof Error ? error : new Error(String(error)))
      return
    }
    const pending = internals.responseBuffer
    if (pending.length > 0 && (pending[0] !== RESPONSE_MAGIC || pending.length > MAX_BUFFERED_REPLY)) {
      server.error(new Error('malformed reply from memcached'))
    }
  }

  const openSocket = server.sock.bind(server)
  const watched = new WeakSet<Socket>()
  server.sock = (sasl: boolean, go: (socket: Socket) => void): void => {
    openSocket(sasl, go)
    const socket = internals._socket
    if (socket && !watched.has(socket)) {
      watched.add(socket)
      // Prepended, so it runs before memjs's own 'close' listener forgets the socket: only a close of the
      // current connection fails the callbacks; a late close of an old one must not fail the new one's.
      let successor: Socket | undefined
      socket.prependOnceListener('close', () => {
        successor = internals._socket === socket ? undefined : internals._socket
        if (internals._socket === socket) server.error(new Error('connection closed'))
      })
      // memjs's listener then forgets whatever socket is current; give back a newer one it dropped.
      socket.once('close', () => {
        if (successor && internals._socket === undefined) internals._socket = successor
      })
    }
  }
}
