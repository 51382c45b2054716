import {
  createCipheriv,
  createDecipheriv,
  createHmac,
  type KeyObject,
  randomBytes,
  timingSafeEqual,
} from 'node:crypto'
import { CorruptSessionError, UnknownStoreKeyError } from '../errors.js'
import type { StoreKeyring } from './store-keys.js'

/**
 * What is stored per session. The data stays in its serialized bytes: they are compared with the bytes
 * serialized at the end of the request, which tells whether the session changed without serializing twice.
 */
export interface SessionRecord {
  /** Incremented on every write; picks the freshest copy when backups disagree. */
  readonly version: number
  /** Epoch ms of the write. */
  readonly writtenAt: number
  /** Epoch ms the session was first stored: what `absoluteTimeout` counts from. */
  readonly createdAt: number
  readonly cookieJson: string
  /** Session data, serialized by the format `format` names. */
  readonly data: Buffer
  readonly format: number
  /**
   * Set on a record read back that was written under a key that no longer writes, or with the other `encrypt`
   * setting: it is rewritten when read, so rotating keys (or turning encryption on) reaches sessions that are
   * only ever read.
   */
  readonly rewrap?: true
}

// Header: magic(1) layout(1) flags(1) format(1) keyId(u32) version(u32) writtenAt(f64) createdAt(f64)
// cookieLength(u32), then the body, cookie (utf8) and data, in one of two forms:
// - plain:     body, then a 16-byte HMAC-SHA256 tag
// - encrypted: salt(16), iv(12), body under AES-256-GCM, its 16-byte tag. The AES key is derived per record
//   from the salt, so no key ever encrypts enough records for random IVs to collide.
// Both tags cover the header and the session's storage digest: a record is valid only under the key it was
// written to, so a copied record cannot hand one session's data to another.
const MAGIC = 0x53
const LAYOUT = 2
const ENCRYPTED = 0x01
const HEADER_BYTES = 32
const TAG_BYTES = 16
const SALT_BYTES = 16
const IV_BYTES = 12
/** Salt and IV, ahead of an encrypted body. */
const NONCE_BYTES = SALT_BYTES + IV_BYTES

export interface CodecOptions {
  readonly keys: StoreKeyring
  /** Encrypt new records (AES-256-GCM); records of either kind are read. */
  readonly encrypt: boolean
}

/**
 * A test that recognizes `blob` when it is read back, keeping only its length and tag (not a whole session).
 * The tag covers every other byte of a blob and the session it belongs to, so another blob has another tag.
 */
export function sameBlob(blob: Buffer): (stored: Buffer) => boolean {
  const length = blob.length
  // A string: a small Buffer would be a slice of Node's shared pool, and keep 8 KiB of it alive.
  const tag = blob.toString('base64', length - TAG_BYTES)
  return (stored) => stored.length === length && stored.toString('base64', length - TAG_BYTES) === tag
}

/** Turns records into the signed (or encrypted) blobs that are stored, and verifies blobs read back. */
export class RecordCodec {
  readonly #options: CodecOptions

  constructor(options: CodecOptions) {
    this.#options = options
  }

  /** The length of `encode(record)`, without encoding it. */
  encodedLength(record: SessionRecord): number {
    const nonce = this.#options.encrypt ? NONCE_BYTES : 0
    return HEADER_BYTES + nonce + Buffer.byteLength(record.cookieJson) + record.data.length + TAG_BYTES
  }

  encode(record: SessionRecord, digest: string): Buffer {
    const key = this.#options.keys.current
    const cookieBytes = Buffer.byteLength(record.cookieJson)
    const bodyBytes = cookieBytes + record.data.length
    const encrypt = this.#options.encrypt
    const blob = Buffer.allocUnsafe(HEADER_BYTES + (encrypt ? NONCE_BYTES : 0) + bodyBytes + TAG_BYTES)
    blob[0] = MAGIC
    blob[1] = LAYOUT
    blob[2] = encrypt ? ENCRYPTED : 0
    blob[3] = record.format
    blob.writeUInt32BE(key.id, 4)
    blob.writeUInt32BE(record.version >>> 0, 8)
    blob.writeDoubleBE(record.writtenAt, 12)
    blob.writeDoubleBE(record.createdAt, 20)
    blob.writeUInt32BE(cookieBytes, 28)
    const header = blob.subarray(0, HEADER_BYTES)
    if (!encrypt) {
      blob.write(record.cookieJson, HEADER_BYTES, 'utf8')
      record.data.copy(blob, HEADER_BYTES + cookieBytes)
      macOf(key.mac, digest, blob.subarray(0, blob.length - TAG_BYTES)).copy(blob, blob.length - TAG_BYTES)
      return blob
    }
    const nonce = randomBytes(NONCE_BYTES)
    nonce.copy(blob, HEADER_BYTES)
    const cipher = createCipheriv('aes-256-gcm', recordKey(key.cipher, nonce), nonce.subarray(SALT_BYTES), {
      authTagLength: TAG_BYTES,
    })
    cipher.setAAD(associatedData(digest, header))
    let at = HEADER_BYTES + NONCE_BYTES
    at += cipher.update(Buffer.from(record.cookieJson, 'utf8')).copy(blob, at)
    at += cipher.update(record.data).copy(blob, at)
    at += cipher.final().copy(blob, at)
    cipher.getAuthTag().copy(blob, at)
    return blob
  }

  /**
   * The record in `blob`, stored under `digest`. CorruptSessionError when it is malformed or fails its tag;
   * UnknownStoreKeyError (a CorruptSessionError) when it names a key this instance does not have.
   */
  decode(blob: Buffer, digest: string): SessionRecord {
    if (blob.length < HEADER_BYTES + TAG_BYTES || blob[0] !== MAGIC || blob[1] !== LAYOUT) {
      throw new CorruptSessionError('stored session has an unknown format')
    }
    const flags = blob[2] as number
    const encrypted = (flags & ENCRYPTED) !== 0
    const cookieBytes = blob.readUInt32BE(28)
    const bodyBytes = blob.length - HEADER_BYTES - TAG_BYTES - (encrypted ? NONCE_BYTES : 0)
    if (flags & ~ENCRYPTED || bodyBytes < 0 || cookieBytes > bodyBytes) {
      throw new CorruptSessionError('stored session is malformed or truncated')
    }
    const key = this.#options.keys.byId(blob.readUInt32BE(4))
    if (!key)
      throw new UnknownStoreKeyError('stored session was written with a key this instance does not have')

    const tag = blob.subarray(blob.length - TAG_BYTES)
    let body: Buffer
    if (encrypted) {
      const nonce = blob.subarray(HEADER_BYTES, HEADER_BYTES + NONCE_BYTES)
      const decipher = createDecipheriv(
        'aes-256-gcm',
        recordKey(key.cipher, nonce),
        nonce.subarray(SALT_BYTES),
        {
          authTagLength: TAG_BYTES,
        },
      )
      decipher.setAAD(associatedData(digest, blob.subarray(0, HEADER_BYTES)))
      decipher.setAuthTag(tag)
      try {
        body = Buffer.concat([
          decipher.update(blob.subarray(HEADER_BYTES + NONCE_BYTES, blob.length - TAG_BYTES)),
          decipher.final(),
        ])
      } catch (cause) {
        throw new CorruptSessionError('stored session failed decryption', { cause })
      }
    } else {
      const expected = macOf(key.mac, digest, blob.subarray(0, blob.length - TAG_BYTES))
      if (!timingSafeEqual(expected, tag))
        throw new CorruptSessionError('stored session failed its integrity check')
      // A copy: the record may outlive the buffer it was read in (a node client's, or sticky mode's memory).
      body = Buffer.from(blob.subarray(HEADER_BYTES, blob.length - TAG_BYTES))
    }
    const record: SessionRecord = {
      version: blob.readUInt32BE(8),
      writtenAt: blob.readDoubleBE(12),
      createdAt: blob.readDoubleBE(20),
      format: blob[3] as number,
      cookieJson: body.toString('utf8', 0, cookieBytes),
      data: body.subarray(cookieBytes),
    }
    const current = key === this.#options.keys.current && encrypted === this.#options.encrypt
    return current ? record : { ...record, rewrap: true }
  }
}

/** The AES key of one record: the cipher key and the record's salt through HMAC-SHA256 (a PRF). */
function recordKey(cipherKey: KeyObject, nonce: Buffer): Buffer {
  return createHmac('sha256', cipherKey).update(nonce.subarray(0, SALT_BYTES)).digest()
}

function macOf(key: KeyObject, digest: string, signed: Buffer): Buffer {
  return createHmac('sha256', key).update(digest).update(signed).digest().subarray(0, TAG_BYTES)
}

function associatedData(digest: string, header: Buffer): Buffer {
  return Buffer.concat([Buffer.from(digest), header])
}
