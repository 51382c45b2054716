/**
 * memcached's binary protocol, as far as this library speaks it: requests are encoded into one buffer each, and
 * replies are cut out of the byte stream in order. Nothing here does I/O.
 */

export const OPCODE = {
  get: 0x00,
  set: 0x01,
  add: 0x02,
  delete: 0x04,
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
 * One reply: its status, CAS unique (8 bytes, a view of the read buffer), value (also a view), and the connection
 * it came on (a CAS unique means something only on the connection that read it).
 */
export interface Reply<Source = unknown> {
  readonly source: Source
  readonly status: number
  readonly opaque: number
  readonly cas: Buffer
  readonly value: Buffer
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

/** The extras of a set or add (flags 0, then the expiry); of a touch, the expiry alone. */
export function expiryExtras(expiry: number, withFlags: boolean): Buffer {
  const extras = Buffer.allocUnsafe(withFlags ? 8 : 4)
  if (withFlags) extras.writeUInt32BE(0, 0)
  extras.writeUInt32BE(expiry, withFlags ? 4 : 0)
  return extras
}

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
      onReply({
        source,
        status: buffer.readUInt16BE(at + 6),
        opaque: buffer.readUInt32BE(at + 12),
        cas: buffer.subarray(at + 16, at + 24),
        value: buffer.subarray(at + HEADER_BYTES + extrasBytes + keyBytes, end),
      })
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
