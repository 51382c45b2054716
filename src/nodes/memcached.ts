import type { Socket } from 'node:net'
import memjs from 'memjs'
import { NodeOperationError, NodeRejectedError } from '../errors.js'
import { type CasOutcome, type CasToken, memcachedExpiry, type OwnedToken, type SessionNode } from './node.js'
import { withTimeout } from './timeout.js'

export interface MemcachedNodeConfig {
  readonly id: string
  readonly host: string
  readonly port: number
  /** SASL PLAIN credentials; memjs authenticates each connection before its first command. */
  readonly credentials?: { readonly username: string; readonly password: string } | undefined
  readonly operationTimeoutMs: number
  readonly probeKey: string
}

const silentMemjsLogger = { log: (): void => {} }

/** Binary protocol opcodes and response statuses used directly (memjs has no CAS variants). */
const OPCODE = { get: 0x00, set: 0x01, add: 0x02, delete: 0x04 } as const
const STATUS = { ok: 0x0000, notFound: 0x0001, exists: 0x0002 } as const
const EMPTY = Buffer.alloc(0)

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
    const { username, password } = config.credentials ?? {}
    this.#server = new memjs.Server(config.host, config.port, username, password, {
      timeout: seconds,
      conntimeout: seconds,
      keepAlive: true,
      keepAliveDelay: 10,
    })
    containMemjsFailures(this.#server)
    batchWrites(this.#server)
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

  async addOwned(key: string, value: Buffer, ttlSeconds: number): Promise<OwnedToken | null> {
    const response = await this.#run('add', () =>
      this.#request(OPCODE.add, key, expiryExtras(ttlSeconds), value),
    )
    if (response.header.status === STATUS.exists) return null
    if (response.header.status !== STATUS.ok) throw this.#rejected('add', response.header.status)
    // The reply's CAS deletes exactly this value for as long as its connection stays open (see #onConnection).
    const owned: MemcachedOwned = { value, cas: this.#casOf(response) }
    return owned as unknown as OwnedToken
  }

  async deleteOwned(key: string, token: OwnedToken): Promise<void> {
    const { value, cas } = token as unknown as MemcachedOwned
    // One CAS delete while the add's connection is open (see #onConnection); otherwise compare the value first.
    if (this.#onConnection(cas.socket)) {
      await this.deleteIfUnchanged(key, cas as unknown as CasToken)
      return
    }
    const read = await this.gets(key)
    if (read?.value.equals(value)) await this.deleteIfUnchanged(key, read.cas)
  }

  delete(key: string): Promise<boolean> {
    return this.#run('delete', () => this.#client.delete(key))
  }

  touch(key: string, ttlSeconds: number): Promise<boolean> {
    return this.#run('touch', () => this.#client.touch(key, memcachedExpiry(ttlSeconds)))
  }

  async gets(key: string): Promise<{ value: Buffer; cas: CasToken } | null> {
    const response = await this.#run('gets', () => this.#request(OPCODE.get, key, EMPTY, EMPTY))
    if (response.header.status === STATUS.notFound) return null
    if (response.header.status !== STATUS.ok) throw this.#rejected('gets', response.header.status)
    // No copy of the value: memjs never writes into a buffer it has parsed, and the codec copies what it keeps.
    return { value: response.val, cas: this.#casOf(response) as unknown as CasToken }
  }

  async setIfUnchanged(key: string, value: Buffer, ttlSeconds: number, cas: CasToken): Promise<CasOutcome> {
    const { unique, socket } = cas as unknown as MemcachedCas
    this.#assertCas(unique)
    if (!this.#onConnection(socket)) return 'conflict'
    const response = await this.#run('cas', () =>
      this.#request(OPCODE.set, key, expiryExtras(ttlSeconds), value, unique),
    )
    return this.#casOutcome('cas', response.header.status)
  }

  async deleteIfUnchanged(key: string, cas: CasToken): Promise<CasOutcome> {
    const { unique, socket } = cas as unknown as MemcachedCas
    this.#assertCas(unique)
    if (!this.#onConnection(socket)) return 'conflict'
    const response = await this.#run('cas delete', () =>
      this.#request(OPCODE.delete, key, EMPTY, EMPTY, unique),
    )
    return this.#casOutcome('cas delete', response.header.status)
  }

  async ping(): Promise<void> {
    await this.get(this.#probeKey)
  }

  async close(): Promise<void> {
    this.#closed = true
    this.#server.error(new Error('node closed'))
  }

  /**
   * One binary-protocol request through memjs's own connection handling, with the CAS field memjs's commands
   * leave out (its set/delete send 0, "no check").
   */
  #request(
    opcode: number,
    key: string,
    extras: Buffer,
    value: Buffer,
    cas?: Buffer,
  ): Promise<memjs.Response> {
    return new Promise((resolve, reject) => {
      this.#client.incrSeq()
      const seq = this.#client.seq
      const request = memjs.Utils.makeRequestBuffer(opcode, key, extras, value, seq)
      if (cas) cas.copy(request, 16)
      this.#client.perform(key, request, seq, (error: Error | null, response?: memjs.Response) => {
        if (error || !response) reject(error ?? new Error('no response'))
        else resolve(response)
      })
    })
  }

  /** A reply's CAS, with the connection the reply came on (no I/O has run since it was read). */
  #casOf(response: memjs.Response): MemcachedCas {
    return {
      unique: Buffer.from(response.header.cas),
      socket: (this.#server as MemjsServerInternals)._socket,
    }
  }

  /**
   * Whether a CAS read or added through `socket` still means what it meant: only while that connection is open,
   * to the same server process (a restart closes every connection, and the new process counts CAS from 1 again,
   * so an old one could match another writer's value).
   */
  #onConnection(socket: Socket | undefined): boolean {
    return (
      socket !== undefined && socket === (this.#server as MemjsServerInternals)._socket && !socket.destroyed
    )
  }

  /** memcached started with -C answers CAS 0, and a write with CAS 0 is unconditional: it must not be sent. */
  #assertCas(cas: Buffer): void {
    if (cas.every((byte) => byte === 0)) {
      throw new NodeRejectedError(
        `${this.address} has compare-and-set disabled (memcached -C); locking and merges need it: start memcached without -C, or use lockingMode 'none'`,
      )
    }
  }

  #casOutcome(operation: string, status: number): CasOutcome {
    if (status === STATUS.ok) return 'stored'
    if (status === STATUS.exists) return 'conflict'
    if (status === STATUS.notFound) return 'missing'
    throw this.#rejected(operation, status)
  }

  #rejected(operation: string, status: number): NodeRejectedError {
    return new NodeRejectedError(`${this.address} refused ${operation}: status 0x${status.toString(16)}`)
  }

  #run<T>(operation: string, start: () => Promise<T>): Promise<T> {
    // memjs would silently reconnect; a closed node must stay closed.
    if (this.#closed) return Promise.reject(new NodeOperationError(`${this.address} is closed`))
    return withTimeout(
      start(),
      this.#timeoutMs,
      () => `${this.address} (${operation})`,
      // A request that timed out may never be answered; failing the connection releases every callback
      // memjs holds for it and the next operation reconnects. Reset, not closed: a close lets the kernel go on
      // sending what is queued, and a write that lands after the node counts as back could not be cleaned up.
      () => {
        const socket = (this.#server as MemjsServerInternals)._socket
        if (socket && !socket.destroyed && !socket.connecting) socket.resetAndDestroy()
        this.#server.error(new Error('operation timed out'))
      },
      (cause) => {
        const message = `${this.address} failed ${operation}: ${describeCause(cause)}`
        // memjs prefixes errors that carry a server reply status with 'MemJS'; anything else is the connection.
        if (cause instanceof Error && cause.message.startsWith('MemJS '))
          return new NodeRejectedError(message, { cause })
        return new NodeOperationError(message, { cause })
      },
    )
  }
}

/** A CAS token on memcached: the CAS unique, and the connection it was read through. */
interface MemcachedCas {
  readonly unique: Buffer
  readonly socket: Socket | undefined
}

/** What addOwned() answers on memcached. */
interface MemcachedOwned {
  readonly value: Buffer
  readonly cas: MemcachedCas
}

/** The extras of a binary set or add: flags (0), then the expiry. */
function expiryExtras(ttlSeconds: number): Buffer {
  const extras = Buffer.alloc(8)
  extras.writeUInt32BE(memcachedExpiry(ttlSeconds), 4)
  return extras
}

/**
 * Requests written in one tick leave in one system call: the socket is corked at the first and uncorked on the
 * next tick. Under load many requests' operations meet in a tick; memjs alone writes each on its own.
 */
function batchWrites(server: memjs.Server): void {
  const internals = server as MemjsServerInternals
  const write = server.write.bind(server)
  let corked: Socket | undefined
  server.write = (blob: Buffer): void => {
    const socket = internals._socket
    if (socket && corked !== socket && !socket.connecting && !socket.destroyed) {
      corked = socket
      socket.cork()
      process.nextTick(() => {
        corked = undefined
        socket.uncork()
      })
    }
    write(blob)
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
