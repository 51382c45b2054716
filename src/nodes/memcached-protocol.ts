/**
 * memcached's binary protocol, as far as this library speaks it: requests are encoded into one buffer each, and
 * replies are cut out of the byte stream in order. Nothing here does I/O.
 */

export const OPCODE = {
  get: 0x00,
  set: 0x01,
  add: 0x02,
  delete: 0x04,
  stat: 0x10,
  touch: 0x1c,
  saslAuth: 0x21,
} as const

export const STATUS = {
  ok: 0x0000,
  notFound: 0x0001,
  exists: 0x0002,
  authError: 0x0020,
  authContinue: 0x0021,
} as const

const REQUEST_MAGIC = 0x80
/** A reply starts with this byte; anything else means the stream is out of step. */
const RESPONSE_MAGIC = 0x81
const HEADER_BYTES = 24
/** The reply limit is never below this (memcached's items are at most 1 MiB by default). */
const MIN_VALUE_LIMIT = 8 * 1024 * 1024
/** Room in a reply's body beyond its value: extras and key. */
const BODY_ROOM = 64 * 1024
export const NO_BYTES = Buffer.alloc(0)

/**
 * One reply: its status, CAS unique (8 bytes), value, and the connection it came on (a CAS unique means something
 * only on the connection that read it). The CAS and the value are cut out of the read buffer when asked for: most
 * replies (to a set, a delete, a touch) are only looked at for their status, and every buffer is an object.
 */
export class Reply<Source = unknown> {
  readonly source: Source
  readonly status: number
  readonly opaque: number
  readonly #buffer: Buffer
  /** Where the reply starts in #buffer, where its value starts and where the reply ends. */
  readonly #at: number
  readonly #valueAt: number
  readonly #end: number

  constructor(source: Source, buffer: Buffer, at: number, valueAt: number, end: number) {
    this.source = source
    this.status = buffer.readUInt16BE(at + 6)
    this.opaque = buffer.readUInt32BE(at + 12)
    this.#buffer = buffer
    this.#at = at
    this.#valueAt = valueAt
    this.#end = end
  }

  /** The CAS unique, copied: a token kept past the reply must not hold the read buffer. */
  copyCas(): Buffer {
    const cas = Buffer.allocUnsafe(8)
    this.#buffer.copy(cas, 0, this.#at + 16, this.#at + HEADER_BYTES)
    return cas
  }

  get value(): Buffer {
    return this.#buffer.subarray(this.#valueAt, this.#end)
  }

  /** The reply's key: empty for most replies; a statistic's name in the replies to a stat request. */
  get key(): string {
    const keyBytes = this.#buffer.readUInt16BE(this.#at + 2)
    return this.#buffer.toString('latin1', this.#valueAt - keyBytes, this.#valueAt)
  }
}

/**
 * A request: header, extras, key, value. `cas`, when given, makes a set or delete conditional; `opaque` comes
 * back in the reply, which is how a reply is matched to its request.
 */
export function encodeRequest(
  opcode: number,
  key: string,
  extras: Buffer,
  value: Buffer,
  opaque: number,
  cas?: Buffer,
): Buffer {
  const keyBytes = Buffer.byteLength(key)
  const bodyBytes = extras.length + keyBytes + value.length
  const request = Buffer.allocUnsafe(HEADER_BYTES + bodyBytes)
  request[0] = REQUEST_MAGIC
  request[1] = opcode
  request.writeUInt16BE(keyBytes, 2)
  request[4] = extras.length
  request[5] = 0 // data type
  request.writeUInt16BE(0, 6) // vbucket
  request.writeUInt32BE(bodyBytes, 8)
  request.writeUInt32BE(opaque, 12)
  if (cas) cas.copy(request, 16, 0, 8)
  else request.fill(0, 16, 24)
  let at = HEADER_BYTES
  if (extras.length > 0) at += extras.copy(request, at)
  at += request.write(key, at, 'utf8')
  if (value.length > 0) value.copy(request, at)
  return request
}

/**
 * The extras of a set or add (flags 0, then the expiry); of a touch, the expiry alone. Read-only: encodeRequest
 * copies them. The last ones made of each kind are reused, as nearly every write of an app has the same expiry.
 */
export function expiryExtras(expiry: number, withFlags: boolean): Buffer {
  const last = withFlags ? lastStoreExtras : lastTouchExtras
  if (last.expiry === expiry) return last.extras
  const extras = Buffer.alloc(withFlags ? 8 : 4)
  extras.writeUInt32BE(expiry, withFlags ? 4 : 0)
  const made = { expiry, extras }
  if (withFlags) lastStoreExtras = made
  else lastTouchExtras = made
  return extras
}

let lastStoreExtras = { expiry: -1, extras: NO_BYTES }
let lastTouchExtras = { expiry: -1, extras: NO_BYTES }

/** SASL PLAIN: the mechanism is the key, `\0user\0password` the value. */
export function saslPlainValue(username: string, password: string): Buffer {
  return Buffer.from(`\0${username}\0${password}`, 'utf8')
}

/** Thrown by the parser for bytes that cannot be memcached replies; the connection must be dropped. */
export class MalformedReplyError extends Error {}

/**
 * Cuts replies out of the bytes a connection receives. Chunks arrive in any sizes; a reply split across chunks
 * is kept until it is whole, its chunks joined once (not at every chunk: a large value arrives in many).
 */
export class ReplyParser<Source> {
  readonly #maxBodyBytes: number
  #chunks: Buffer[] = []
  #buffered = 0
  /** Bytes needed before parsing can go on: a header, or the whole reply once its header is known. */
  #needed = HEADER_BYTES

  /** `maxValueBytes`: the largest value a reply may carry; a reply claiming more is a misparse, not data. */
  constructor(maxValueBytes: number) {
    this.#maxBodyBytes = Math.max(maxValueBytes, MIN_VALUE_LIMIT) + BODY_ROOM
  }

  /** Calls `onReply` for every whole reply received so far. */
  push(chunk: Buffer, source: Source, onReply: (reply: Reply<Source>) => void): void {
    this.#chunks.push(chunk)
    this.#buffered += chunk.length
    if (this.#buffered < this.#needed) return
    const buffer = this.#chunks.length === 1 ? chunk : Buffer.concat(this.#chunks, this.#buffered)
    let at = 0
    let needed = HEADER_BYTES
    while (buffer.length - at >= HEADER_BYTES) {
      if (buffer[at] !== RESPONSE_MAGIC) throw new MalformedReplyError('malformed reply from memcached')
      const bodyBytes = buffer.readUInt32BE(at + 8)
      if (bodyBytes > this.#maxBodyBytes) throw new MalformedReplyError('malformed reply from memcached')
      const end = at + HEADER_BYTES + bodyBytes
      if (buffer.length < end) {
        needed = HEADER_BYTES + bodyBytes
        break
      }
      const extrasBytes = buffer[at + 4] as number
      const keyBytes = buffer.readUInt16BE(at + 2)
      if (extrasBytes + keyBytes > bodyBytes) throw new MalformedReplyError('malformed reply from memcached')
      onReply(new Reply(source, buffer, at, at + HEADER_BYTES + extrasBytes + keyBytes, end))
      at = end
    }
    // Node never writes into a buffer it has handed to a 'data' listener, so views of it stay valid.
    const rest = buffer.subarray(at)
    this.#chunks = rest.length === 0 ? [] : [rest]
    this.#buffered = rest.length
    this.#needed = needed
  }

  reset(): void {
    this.#chunks = []
    this.#buffered = 0
    this.#needed = HEADER_BYTES
  }
}
