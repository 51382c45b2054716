import { RecordCodec, type SessionRecord } from '../../src/core/codec.js'
import { storageKeys } from '../../src/core/keys.js'
import { StoreKeyring } from '../../src/core/store-keys.js'
import { parseSessionId } from '../../src/index.js'

/** The JSON serializer's tag, as stored in every record the default configuration writes. */
export const JSON_FORMAT = 1

/**
 * Reads and writes stored records the way an app configured with `secrets` does: for tests that look into the
 * cache, or plant something in it.
 */
export function recordsOf(secrets: string | readonly (string | Buffer)[], { encrypt = false } = {}) {
  const codec = new RecordCodec({
    keys: new StoreKeyring(typeof secrets === 'string' ? [secrets] : secrets),
    encrypt,
  })
  const digestOf = (id: string | undefined) => storageKeys('sf:', parseSessionId(id)?.random ?? '').digest
  return {
    encode(id: string | undefined, record: Partial<SessionRecord> & { json?: string }): Buffer {
      const now = Date.now()
      return codec.encode(
        {
          version: 1,
          writtenAt: now,
          createdAt: now,
          cookieJson: '{"path":"/","httpOnly":true,"originalMaxAge":null}',
          data: Buffer.from(record.json ?? '{}'),
          format: JSON_FORMAT,
          ...record,
        },
        digestOf(id),
      )
    },
    decode(id: string | undefined, blob: Buffer): SessionRecord {
      return codec.decode(blob, digestOf(id))
    },
    /** The stored data of a JSON-serialized record. */
    dataOf<T = Record<string, unknown>>(id: string | undefined, blob: Buffer): T {
      return JSON.parse(codec.decode(blob, digestOf(id)).data.toString()) as T
    },
  }
}
