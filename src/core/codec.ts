import { CorruptSessionError } from '../errors.js'

/**
 * What is stored per session. The session data and its cookie are kept as separate JSON texts: the data text
 * read from the cache is compared with the data text serialized at the end of the request, which tells whether
 * the session changed without hashing and without serializing anything twice.
 */
export interface SessionRecord {
  /** Incremented on every write; picks the freshest copy when backups disagree. */
  readonly version: number
  /** Epoch ms of the write. */
  readonly writtenAt: number
  readonly cookieJson: string
  readonly dataJson: string
}

// Layout: magic(1) format(1) version(u32) writtenAt(f64) cookieLength(u32) cookie(utf8) data(utf8)
const MAGIC = 0x53
const FORMAT = 1
const HEADER_BYTES = 18

export function encodeRecord(record: SessionRecord): Buffer {
  const cookieBytes = Buffer.byteLength(record.cookieJson)
  const dataBytes = Buffer.byteLength(record.dataJson)
  const blob = Buffer.allocUnsafe(HEADER_BYTES + cookieBytes + dataBytes)
  blob[0] = MAGIC
  blob[1] = FORMAT
  blob.writeUInt32BE(record.version >>> 0, 2)
  blob.writeDoubleBE(record.writtenAt, 6)
  blob.writeUInt32BE(cookieBytes, 14)
  blob.write(record.cookieJson, HEADER_BYTES, 'utf8')
  blob.write(record.dataJson, HEADER_BYTES + cookieBytes, 'utf8')
  return blob
}

export function decodeRecord(blob: Buffer): SessionRecord {
  if (blob.length < HEADER_BYTES || blob[0] !== MAGIC || blob[1] !== FORMAT) {
    throw new CorruptSessionError('stored session has an unknown format')
  }
  const cookieBytes = blob.readUInt32BE(14)
  if (HEADER_BYTES + cookieBytes > blob.length) throw new CorruptSessionError('stored session is truncated')
  return {
    version: blob.readUInt32BE(2),
    writtenAt: blob.readDoubleBE(6),
    cookieJson: blob.toString('utf8', HEADER_BYTES, HEADER_BYTES + cookieBytes),
    dataJson: blob.toString('utf8', HEADER_BYTES + cookieBytes),
  }
}
