import { createSecretKey, hkdfSync, type KeyObject } from 'node:crypto'

/** The keys one secret yields for stored sessions. */
export interface StoreKey {
  /** Written into every record, so a reader finds the key without trying each one. */
  readonly id: number
  /** HMAC-SHA256 key of the integrity tag. A KeyObject: an HMAC made with one skips importing a raw key. */
  readonly mac: KeyObject
  /** Key of the HMAC that derives each record's AES-256-GCM key. */
  readonly cipher: KeyObject
}

const SALT = 'session-failover store keys'

function derive(secret: string | Buffer, purpose: string, bytes: number): Buffer {
  return Buffer.from(hkdfSync('sha256', secret, SALT, purpose, bytes))
}

/**
 * Keys of stored sessions, derived (HKDF) from `storeKeys`, or else from the cookie `secret`s: a separate key
 * per purpose, so the cookie signature, the integrity tag and the cipher never share one. The first secret
 * writes; every secret reads, which is how keys rotate.
 */
export class StoreKeyring {
  readonly current: StoreKey
  readonly #byId = new Map<number, StoreKey>()

  constructor(secrets: readonly (string | Buffer)[]) {
    const keys = secrets.map(
      (secret): StoreKey => ({
        id: derive(secret, 'key id', 4).readUInt32BE(0),
        mac: createSecretKey(derive(secret, 'integrity', 32)),
        cipher: createSecretKey(derive(secret, 'aes-256-gcm', 32)),
      }),
    )
    const [current] = keys
    if (!current) throw new TypeError('StoreKeyring needs at least one secret')
    this.current = current
    for (const key of keys) if (!this.#byId.has(key.id)) this.#byId.set(key.id, key)
  }

  byId(id: number): StoreKey | undefined {
    return this.#byId.get(id)
  }
}
