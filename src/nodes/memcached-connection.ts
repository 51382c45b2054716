import { connect, type Socket } from 'node:net'
import { setImmediate } from 'node:timers'
import { sendAtEndOfTurn } from '../end-of-turn.js'
import { NodeOperationError, OperationTimeoutError } from '../errors.js'
import {
  encodeRequest,
  MalformedReplyError,
  NO_BYTES,
  OPCODE,
  type Reply,
  ReplyParser,
  STATUS,
  saslPlainValue,
} from './memcached-protocol.js'

export interface MemcachedConnectionOptions {
  readonly host: string
  readonly port: number
  /** SASL PLAIN credentials, sent before anything else on every new connection. */
  readonly credentials?: { readonly username: string; readonly password: string } | undefined
  readonly timeoutMs: number
  /** The largest value a reply may carry (the largest session); a reply claiming more drops the connection. */
  readonly maxValueBytes: number
  /** How the node is named in errors, e.g. `memcached 127.0.0.1:11211`. */
  readonly address: string
}

export type MemcachedReply = Reply<Socket>

interface Pending {
  readonly opaque: number
  readonly operation: string
  /** performance.now() by which the reply is due: set when the request leaves, infinite until then. */
  deadline: number
  readonly resolve: (reply: MemcachedReply) => void
  readonly reject: (error: Error) => void
  /** A stat request's: takes each statistic's reply; the last reply, with no key, resolves. */
  readonly onStat: ((reply: MemcachedReply) => void) | undefined
}

/** Milliseconds of idleness before TCP keep-alive probes a connection. */
const KEEP_ALIVE_MS = 10_000
/** A turn's requests up to this many bytes in all are joined into one buffer before they are written. */
const JOIN_BYTES = 16 * 1024
/**
 * What an item takes beyond its key and value, at most: memcached 1.6 refuses a value once value, key and 58
 * bytes pass its item_size_max (measured at -I 512k and 1m); older versions also keep a text suffix of up to
 * about 40 bytes. Rounded up: a refused write deletes what its key held.
 */
const ITEM_HEADER_BYTES = 128

/**
 * One connection to one memcached server, opened on first use and again after any failure. Replies come back in
 * request order, so pending requests wait in a queue and only the oldest has a deadline that matters: one timer
 * per connection instead of one per operation. Requests made in one turn of the event loop leave in one system
 * call: they are queued until the end of the turn (end-of-turn.ts), after every callback of that turn's I/O has
 * run and before the turn's responses. Under load one turn serves many HTTP requests; process.nextTick would send
 * after each of them.
 *
 * Every request settles: with its reply, or with OperationTimeoutError when the oldest pending request outlives
 * the timeout, or with NodeOperationError when the connection fails, closes, answers out of step, or refuses the
 * credentials. A timed-out connection is reset, not closed: a close lets the kernel go on sending what is still
 * queued. Requests the server already received may still run when it resumes (a frozen server); the ring
 * deletes what such a late write leaves before the node counts as back.
 */
export class MemcachedConnection {
  readonly #options: MemcachedConnectionOptions
  readonly #parser: ReplyParser<Socket>
  #socket: Socket | undefined
  #queue: Pending[] = []
  #opaque = 0
  #timer: NodeJS.Timeout | undefined
  /** This turn's requests, sent at its end (see #flush). */
  #outgoing: Buffer[] = []
  #outgoingBytes = 0
  #closed = false
  /** The server's item_size_max, as the open connection learned it; undefined until it has. */
  #itemSizeMax: number | undefined
  /** Settles once the open connection has learned #itemSizeMax: with the connection's failure if it failed first. */
  #itemSizeLearned: Promise<Error | undefined> = Promise.resolve(undefined)
  /** The item_size_max learned last, on any connection. */
  #lastItemSizeMax: number | undefined

  constructor(options: MemcachedConnectionOptions) {
    this.#options = options
    this.#parser = new ReplyParser<Socket>(options.maxValueBytes)
  }

  /** The open connection, if any: a CAS read through another one no longer means the same value. */
  get socket(): Socket | undefined {
    return this.#socket
  }

  request(
    operation: string,
    opcode: number,
    key: string,
    extras: Buffer,
    value: Buffer,
    cas?: Buffer,
  ): Promise<MemcachedReply> {
    if (this.#closed) return Promise.reject(new NodeOperationError(`${this.#options.address} is closed`))
    const socket = this.#socket ?? this.#connect()
    // The executor is made once per connection (see #capture): a closure over this call's seven arguments would
    // be one more object, and its context another, on every node operation.
    const replied = new Promise<MemcachedReply>(this.#capture)
    const resolve = this.#resolve as Pending['resolve']
    const reject = this.#reject as Pending['reject']
    // Not kept: they would hold the last request's continuation until the next request.
    this.#resolve = this.#reject = undefined
    try {
      this.#send(socket, operation, opcode, key, extras, value, cas, resolve, reject)
    } catch (error) {
      reject(error instanceof Error ? error : new Error(String(error)))
    }
    return replied
  }

  /** What #capture was given, until request() takes it: the functions that settle the promise just made. */
  #resolve: Pending['resolve'] | undefined
  #reject: Pending['reject'] | undefined
  /** The executor of every request's promise (Promise.withResolvers() needs Node 22). */
  readonly #capture = (resolve: Pending['resolve'], reject: Pending['reject']): void => {
    this.#resolve = resolve
    this.#reject = reject
  }

  /**
   * The largest value the server stores under a key of `keyBytes` (memcached refuses a larger one, and deletes
   * the value stored under that key). A promise while the connection, opened now if need be, has not learned
   * it yet, settling with the connection's failure if it failed first (a write sent now would fail with it, or
   * wait a second timeout on a new connection); Infinity for a server that does not say (no `stat settings`).
   */
  largestValue(keyBytes: number): number | Promise<Error | undefined> {
    if (!this.#closed && this.#socket === undefined) this.#connect()
    if (this.#itemSizeMax === undefined && this.#socket !== undefined) return this.#itemSizeLearned
    return (this.#itemSizeMax ?? Number.POSITIVE_INFINITY) - keyBytes - ITEM_HEADER_BYTES
  }

  /** largestValue() as last learned, on this connection or an earlier one; undefined before any has. */
  largestValueKnown(keyBytes: number): number | undefined {
    const max = this.#lastItemSizeMax
    return max === undefined ? undefined : max - keyBytes - ITEM_HEADER_BYTES
  }

  /** Fails whatever is pending; later requests are refused. */
  close(): void {
    this.#closed = true
    if (this.#socket) this.#drop(this.#socket, new NodeOperationError(`${this.#options.address} was closed`))
  }

  #send(
    socket: Socket,
    operation: string,
    opcode: number,
    key: string,
    extras: Buffer,
    value: Buffer,
    cas: Buffer | undefined,
    resolve: (reply: MemcachedReply) => void,
    reject: (error: Error) => void,
    onStat?: (reply: MemcachedReply) => void,
  ): void {
    this.#opaque = (this.#opaque + 1) >>> 0
    const opaque = this.#opaque
    // Encoded first: a request that cannot be (no memory for its buffer) must not wait for a reply in the queue.
    const request = encodeRequest(opcode, key, extras, value, opaque, cas)
    this.#queue.push({ opaque, operation, deadline: Number.POSITIVE_INFINITY, resolve, reject, onStat })
    if (this.#timer === undefined) this.#arm(this.#options.timeoutMs)
    if (this.#outgoing.length === 0) sendAtEndOfTurn(() => this.#flush(socket))
    this.#outgoing.push(request)
    this.#outgoingBytes += request.length
  }

  /**
   * Sends what this turn queued on `socket`. Small requests are joined and written once: a write through the
   * socket's stream costs more than the copy (its bookkeeping, per write, on every request's path). Larger ones
   * are written corked, leaving in one system call all the same.
   */
  #flush(socket: Socket): void {
    // Dropped since: its requests were failed, and what is queued now is for the next connection.
    if (socket !== this.#socket) return
    const outgoing = this.#outgoing
    const bytes = this.#outgoingBytes
    this.#outgoing = []
    this.#outgoingBytes = 0
    // The timeout counts from here, not from when the request was made: a turn that ran long (a slow handler)
    // before it sent must not use up the node's time. A monotonic clock: a step of the wall clock (NTP, an
    // operator) must neither hold a request past its timeout nor time out a healthy node's. The last requests
    // queued are this turn's: every request is queued with its bytes, and a drop empties both.
    const deadline = performance.now() + this.#options.timeoutMs
    const queue = this.#queue
    for (let at = queue.length - outgoing.length; at < queue.length; at++)
      (queue[at] as Pending).deadline = deadline
    if (outgoing.length === 1) socket.write(outgoing[0] as Buffer)
    else if (bytes <= JOIN_BYTES) socket.write(Buffer.concat(outgoing, bytes))
    else {
      socket.cork()
      for (const request of outgoing) socket.write(request)
      socket.uncork()
    }
  }

  #connect(): Socket {
    const { host, port, credentials } = this.#options
    const socket = connect({
      host,
      port,
      noDelay: true,
      keepAlive: true,
      keepAliveInitialDelay: KEEP_ALIVE_MS,
    })
    this.#socket = socket
    this.#parser.reset()
    socket.on('data', (chunk: Buffer) => this.#onData(socket, chunk))
    socket.on('error', (error) => this.#drop(socket, this.#connectionError(error.message, error)))
    socket.on('close', () => this.#drop(socket, this.#connectionError('connection closed')))
    if (credentials) {
      const refused = (reply: MemcachedReply): void => {
        if (reply.status === STATUS.ok) return
        this.#drop(
          socket,
          new NodeOperationError(
            `${this.#options.address} refused authentication as '${credentials.username}' (status 0x${reply.status.toString(16)})`,
          ),
        )
      }
      this.#send(
        socket,
        'authenticate',
        OPCODE.saslAuth,
        'PLAIN',
        NO_BYTES,
        saslPlainValue(credentials.username, credentials.password),
        undefined,
        refused,
        () => {},
      )
    }
    this.#learnItemSize(socket)
    return socket
  }

  /**
   * Asks the server its item_size_max, first on every connection (after the credentials): a server may restart
   * with another -I. Until the answer, largestValue() is a promise.
   */
  #learnItemSize(socket: Socket): void {
    this.#itemSizeMax = undefined
    let learned = (_failure?: Error): void => {}
    this.#itemSizeLearned = new Promise((resolve) => {
      learned = resolve
    })
    let itemSizeMax = Number.POSITIVE_INFINITY
    const onStat = (reply: MemcachedReply): void => {
      if (reply.key !== 'item_size_max') return
      const value = Number(reply.value.toString('latin1'))
      if (Number.isSafeInteger(value) && value > 0) itemSizeMax = value
    }
    const answered = (): void => {
      if (socket === this.#socket) {
        this.#itemSizeMax = itemSizeMax
        if (Number.isFinite(itemSizeMax)) this.#lastItemSizeMax = itemSizeMax
      }
      learned()
    }
    // A refusal (no stat command) is answered too: no limit is known then, and none is applied.
    this.#send(
      socket,
      'stat settings',
      OPCODE.stat,
      'settings',
      NO_BYTES,
      NO_BYTES,
      undefined,
      answered,
      learned,
      onStat,
    )
  }

  #onData(socket: Socket, chunk: Buffer): void {
    if (socket !== this.#socket) return
    try {
      this.#parser.push(chunk, socket, this.#onReply)
    } catch (error) {
      this.#drop(socket, this.#connectionError(error instanceof Error ? error.message : String(error)))
    }
  }

  /** Bound once: the parser calls it for every reply. */
  readonly #onReply = (reply: MemcachedReply): void => {
    const head = this.#queue[0]
    if (head?.opaque !== reply.opaque) throw new MalformedReplyError('reply out of step with the requests')
    // A server that wants credentials this node was not given (restarted with SASL on) is unavailable to us, not
    // refusing one command; it closes the connection after this reply anyway. Thrown: the connection drops.
    const status = reply.status
    if (
      (status === STATUS.authError || status === STATUS.authContinue) &&
      head.operation !== 'authenticate'
    ) {
      throw new Error('authentication required: configure a username and password for this node')
    }
    // A stat request is answered with a reply per statistic, then one with no key.
    if (head.onStat !== undefined && reply.key !== '') {
      head.onStat(reply)
      return
    }
    this.#queue.shift()
    head.resolve(reply)
  }

  #arm(delayMs: number): void {
    this.#timer = setTimeout(() => this.#checkDeadline(), delayMs)
    this.#timer.unref()
  }

  #checkDeadline(): void {
    this.#timer = undefined
    const head = this.#queue[0]
    if (!head) return
    const now = performance.now()
    if (head.deadline > now) {
      // Not sent yet (infinite): it leaves at the end of this turn.
      this.#arm(Math.min(head.deadline - now, this.#options.timeoutMs))
      return
    }
    // Timers run before the loop reads its sockets. After a stall of this process's own loop (a long synchronous
    // handler or garbage collection) the reply may have come in time and be waiting unread: a healthy node would
    // be called dead. Decided once the loop has read its sockets, in the check phase of the same pass.
    setImmediate(() => this.#expire(head))
  }

  #expire(head: Pending): void {
    if (this.#queue[0] !== head) {
      // Answered after all (or failed with its connection): the next one's deadline now matters.
      if (this.#timer === undefined) this.#checkDeadline()
      return
    }
    const socket = this.#socket
    if (!socket) return
    // A request that was not answered in time may never be: nothing queued behind it on this connection will be.
    if (!socket.destroyed && !socket.connecting) socket.resetAndDestroy()
    this.#drop(socket, undefined)
  }

  /** Fails every pending request (with a timeout when `error` is undefined) and forgets the connection. */
  #drop(socket: Socket, error: Error | undefined): void {
    if (socket !== this.#socket) return
    this.#socket = undefined
    this.#parser.reset()
    // Whatever this turn queued was for that socket: its requests are failed below.
    this.#outgoing = []
    this.#outgoingBytes = 0
    if (this.#timer) clearTimeout(this.#timer)
    this.#timer = undefined
    if (!socket.destroyed) socket.destroy()
    const pending = this.#queue
    this.#queue = []
    const { address, timeoutMs } = this.#options
    for (const request of pending) {
      request.reject(
        error
          ? new NodeOperationError(`${address} failed ${request.operation}: ${error.message}`, {
              cause: error,
            })
          : new OperationTimeoutError(
              `${address} (${request.operation}) did not answer within ${timeoutMs} ms`,
            ),
      )
    }
  }

  #connectionError(message: string, cause?: unknown): NodeOperationError {
    return new NodeOperationError(message, cause === undefined ? undefined : { cause })
  }
}
