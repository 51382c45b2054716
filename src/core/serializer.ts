import { createRequire } from 'node:module'
import v8 from 'node:v8'
import {
  ConfigError,
  CorruptSessionError,
  UnreadableFormatError,
  UnserializableSessionError,
} from '../errors.js'
import type { SessionRecord } from './codec.js'
import type { SessionSnapshot } from './session-state.js'

/** A user's serializer: turns session data (a plain object, cookie excluded) into bytes and back. */
export interface CustomSerializer {
  serialize(data: Record<string, unknown>): string | Uint8Array
  deserialize(bytes: Buffer): unknown
}

export type SerializerOption = 'json' | 'v8' | 'msgpack' | CustomSerializer

export interface SessionContent {
  /** Application data, without the cookie. */
  readonly data: Record<string, unknown>
  /** The stored cookie fields (express-session's cookie.data). */
  readonly cookie: Record<string, unknown>
}

interface Format {
  /** Stored with every record: a record is read with the format that wrote it, whatever is configured now. */
  readonly tag: number
  serialize(data: Record<string, unknown>): Buffer
  deserialize(bytes: Buffer): unknown
}

const CUSTOM_TAG = 0

const json: Format = {
  tag: 1,
  serialize: (data) => Buffer.from(JSON.stringify(data)),
  deserialize: (bytes) => JSON.parse(bytes.toString('utf8')),
}

const structuredClone: Format = {
  tag: 2,
  serialize: (data) => v8.serialize(data),
  deserialize: (bytes) => v8.deserialize(bytes),
}

const MSGPACK_TAG = 3

/** msgpackr is an optional peer dependency, loaded only when configured (or when a stored record needs it). */
function msgpack(): Format {
  let msgpackr: typeof import('msgpackr')
  try {
    msgpackr = createRequire(import.meta.url)('msgpackr') as typeof import('msgpackr')
  } catch (cause) {
    throw new ConfigError("serializer 'msgpack' needs the msgpackr package: npm install msgpackr", { cause })
  }
  // Without shared structures every message carries its own record definitions, so any process reads it.
  const packr = new msgpackr.Packr({
    structuredClone: true,
    moreTypes: true,
    int64AsType: 'bigint',
    useBigIntExtension: true,
  })
  return {
    tag: MSGPACK_TAG,
    // pack() returns a view of a buffer it reuses for the next call.
    serialize: (data) => Buffer.from(packr.pack(data)),
    deserialize: (bytes) => packr.unpack(bytes),
  }
}

function custom(serializer: CustomSerializer): Format {
  return {
    tag: CUSTOM_TAG,
    serialize(data) {
      const out = serializer.serialize(data)
      if (typeof out === 'string') return Buffer.from(out)
      // Copied: a serializer may hand out a view of a buffer it writes the next session into (as msgpackr's
      // pack() does), and these bytes are kept, compared and cached long after this call.
      if (out instanceof Uint8Array) return Buffer.from(out)
      throw new TypeError(`serialize() returned ${typeof out}, not a string or a Uint8Array`)
    },
    deserialize: (bytes) => serializer.deserialize(bytes),
  }
}

/**
 * Turns session data into the bytes that are stored, and back. The data is serialized once per request; the
 * bytes read are compared with the bytes about to be written to tell whether the session changed. The cookie is
 * always JSON and kept apart, so a cookie refresh is not a modification.
 */
export class SessionSerializer {
  readonly #format: Format
  #msgpack: Format | undefined
  /** The configured format's serialization of `{}`: a new session's data. */
  readonly empty: Buffer

  constructor(option: SerializerOption = 'json') {
    this.#format =
      option === 'json'
        ? json
        : option === 'v8'
          ? structuredClone
          : option === 'msgpack'
            ? this.#msgpackFormat()
            : custom(option)
    this.empty = this.serialize({})
  }

  get tag(): number {
    return this.#format.tag
  }

  /** Throws UnserializableSessionError when the data holds what the format cannot store (a BigInt in JSON...). */
  serialize(data: Record<string, unknown>): Buffer {
    try {
      return this.#format.serialize(data)
    } catch (cause) {
      throw new UnserializableSessionError(
        `The session data cannot be serialized (${cause instanceof Error ? cause.message : String(cause)}); nothing was written`,
        { cause },
      )
    }
  }

  /**
   * Bytes of `tag`'s format into a plain object. UnreadableFormatError when this instance has no such format
   * (another instance's custom serializer, msgpackr not installed here); CorruptSessionError for bytes the
   * format cannot read.
   */
  deserialize(bytes: Buffer, tag: number): Record<string, unknown> {
    const format = this.#formatOf(tag)
    let value: unknown
    try {
      value = format.deserialize(bytes)
    } catch (cause) {
      throw new CorruptSessionError('stored session data cannot be deserialized', { cause })
    }
    if (!isRecord(value)) throw new CorruptSessionError('stored session data is not an object')
    return value
  }

  /** What the adapter hands over when the response is about to go out. */
  snapshot(session: object, cookie: object): SessionSnapshot {
    const { cookie: _ignored, ...data } = session as Record<string, unknown>
    const { expires } = cookie as { expires?: unknown }
    // maxAge set to NaN or Infinity (or expires to an invalid Date) by the application: no TTL can be computed,
    // and memcached would read a NaN expiry as "never". Nothing is written, as for any value that cannot be stored.
    if (expires instanceof Date && !Number.isFinite(expires.getTime())) {
      throw new UnserializableSessionError(
        'the session cookie expires at no valid date (cookie.maxAge or cookie.expires set to NaN, Infinity or an invalid Date)',
      )
    }
    return {
      data: this.serialize(data),
      cookieJson: JSON.stringify(cookie),
      expires: expires instanceof Date ? expires : null,
    }
  }

  content(record: Pick<SessionRecord, 'data' | 'format' | 'cookieJson'>): SessionContent {
    const data = this.deserialize(record.data, record.format)
    let cookie: unknown
    try {
      cookie = JSON.parse(record.cookieJson)
    } catch (cause) {
      throw new CorruptSessionError('stored session cookie is not valid JSON', { cause })
    }
    if (!isRecord(cookie)) throw new CorruptSessionError('stored session cookie is not an object')
    return { data, cookie }
  }

  /** Bytes that are equal exactly when two values serialize alike: how a merge tells which keys changed. */
  fingerprint(value: unknown): string {
    return this.serialize({ v: value }).toString('latin1')
  }

  #formatOf(tag: number): Format {
    if (tag === this.#format.tag) return this.#format
    if (tag === json.tag) return json
    if (tag === structuredClone.tag) return structuredClone
    if (tag === MSGPACK_TAG) {
      try {
        return this.#msgpackFormat()
      } catch (cause) {
        throw new UnreadableFormatError(
          'stored session data is msgpack, and msgpackr is not installed here',
          {
            cause,
          },
        )
      }
    }
    throw new UnreadableFormatError(`stored session data has format ${tag}, which this instance cannot read`)
  }

  #msgpackFormat(): Format {
    this.#msgpack ??= msgpack()
    return this.#msgpack
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}
