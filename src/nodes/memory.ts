import type { CasOutcome, CasToken, OwnedToken, SessionNode } from './node.js'

interface Entry {
  value: Buffer
  expiresAt: number
  /** Changes on every write: the compare-and-set token. */
  cas: number
}

/**
 * The development fallback used when no `nodes` are configured, like express-session's MemoryStore: sessions
 * live in this process and die with it. Expired entries are dropped when read and by an unref'd sweep.
 */
export class MemoryNode implements SessionNode {
  readonly id: string
  readonly address = 'in-process memory'
  /** Every operation takes effect when it is called. */
  readonly ordered = true
  readonly #entries = new Map<string, Entry>()
  #nextCas = 1
  readonly #sweep: NodeJS.Timeout

  constructor(id: string) {
    this.id = id
    this.#sweep = setInterval(() => this.#dropExpired(), 60_000)
    this.#sweep.unref()
  }

  async get(key: string): Promise<Buffer | null> {
    return this.#live(key)?.value ?? null
  }

  async set(key: string, value: Buffer, ttlSeconds: number): Promise<void> {
    this.#entries.set(key, { value, expiresAt: Date.now() + ttlSeconds * 1000, cas: this.#nextCas++ })
  }

  async gets(key: string): Promise<{ value: Buffer; cas: CasToken } | null> {
    const entry = this.#live(key)
    return entry ? { value: entry.value, cas: entry.cas as unknown as CasToken } : null
  }

  async setIfUnchanged(key: string, value: Buffer, ttlSeconds: number, cas: CasToken): Promise<CasOutcome> {
    const entry = this.#live(key)
    if (!entry) return 'missing'
    if (entry.cas !== (cas as unknown as number)) return 'conflict'
    await this.set(key, value, ttlSeconds)
    return 'stored'
  }

  async deleteIfUnchanged(key: string, cas: CasToken): Promise<CasOutcome> {
    const entry = this.#live(key)
    if (!entry) return 'missing'
    if (entry.cas !== (cas as unknown as number)) return 'conflict'
    this.#entries.delete(key)
    return 'stored'
  }

  async add(key: string, value: Buffer, ttlSeconds: number): Promise<boolean> {
    if (this.#live(key)) return false
    await this.set(key, value, ttlSeconds)
    return true
  }

  async addOwned(key: string, value: Buffer, ttlSeconds: number): Promise<OwnedToken | null> {
    return (await this.add(key, value, ttlSeconds)) ? (value as unknown as OwnedToken) : null
  }

  async deleteOwned(key: string, token: OwnedToken): Promise<void> {
    if (this.#live(key)?.value.equals(token as unknown as Buffer)) this.#entries.delete(key)
  }

  async delete(key: string): Promise<boolean> {
    return this.#entries.delete(key)
  }

  async touch(key: string, ttlSeconds: number): Promise<boolean> {
    const entry = this.#live(key)
    if (!entry) return false
    entry.expiresAt = Date.now() + ttlSeconds * 1000
    return true
  }

  async ping(): Promise<void> {}

  async close(): Promise<void> {
    clearInterval(this.#sweep)
    this.#entries.clear()
  }

  #live(key: string): Entry | undefined {
    const entry = this.#entries.get(key)
    if (entry && entry.expiresAt <= Date.now()) {
      this.#entries.delete(key)
      return undefined
    }
    return entry
  }

  #dropExpired(): void {
    const now = Date.now()
    for (const [key, entry] of this.#entries) if (entry.expiresAt <= now) this.#entries.delete(key)
  }
}
