import type { Socket } from 'node:net'
import { NodeRejectedError } from '../errors.js'
import { MemcachedConnection, type MemcachedReply } from './memcached-connection.js'
import { expiryExtras, NO_BYTES, OPCODE, STATUS } from './memcached-protocol.js'
import { type CasOutcome, type CasToken, memcachedExpiry, type OwnedToken, type SessionNode } from './node.js'

export interface MemcachedNodeConfig {
  readonly id: string
  readonly host: string
  readonly port: number
  /** SASL PLAIN credentials; each connection authenticates before its first command. */
  readonly credentials?: { readonly username: string; readonly password: string } | undefined
  readonly operationTimeoutMs: number
  readonly probeKey: string
  /** The largest value stored (maxSessionBytes): replies up to it are read. At least 8 MiB either way. */
  readonly maxValueBytes?: number | undefined
}

/** What a few refusals mean, for the error message. */
const STATUS_NAMES: Record<number, string> = {
  3: 'value too large',
  4: 'invalid arguments',
  5: 'item not stored',
  32: 'authentication required: configure a username and password for this node',
  129: 'unknown command',
  130: 'out of memory',
}

/**
 * One memcached server over the binary protocol, on one connection of our own (see MemcachedConnection). Which
 * node holds a session is decided by the ring, from the session id; this class knows keys and bytes.
 */
export class MemcachedNode implements SessionNode {
  readonly id: string
  readonly address: string
  /** One connection: memcached answers it in order. */
  readonly ordered = true
  readonly #connection: MemcachedConnection
  readonly #probeKey: string

  constructor(config: MemcachedNodeConfig) {
    this.id = config.id
    this.address = `memcached ${config.host}:${config.port}`
    this.#probeKey = config.probeKey
    this.#connection = new MemcachedConnection({
      host: config.host,
      port: config.port,
      credentials: config.credentials,
      timeoutMs: config.operationTimeoutMs,
      maxValueBytes: config.maxValueBytes ?? 0,
      address: this.address,
    })
  }

  // Each operation is one async function around its request; its reply is read by plain methods. An async frame
  // on every node operation's path allocates about 450 B (bench:profile --alloc --no-inlining).

  async get(key: string): Promise<Buffer | null> {
    // No copy: the reply is a view of a buffer nothing writes into again, and the codec copies what it keeps.
    return this.#readReply('get', await this.#read('get', key))?.value ?? null
  }

  async set(key: string, value: Buffer, ttlSeconds: number): Promise<void> {
    const reply = await this.#connection.request('set', OPCODE.set, key, storeExtras(ttlSeconds), value)
    if (reply.status !== STATUS.ok) throw this.#rejected('set', reply.status)
  }

  async add(key: string, value: Buffer, ttlSeconds: number): Promise<boolean> {
    return this.#addReply(await this.#add(key, value, ttlSeconds)) !== null
  }

  async addOwned(key: string, value: Buffer, ttlSeconds: number): Promise<OwnedToken | null> {
    const reply = this.#addReply(await this.#add(key, value, ttlSeconds))
    if (!reply) return null
    // The reply's CAS deletes exactly this value for as long as its connection stays open (see #onConnection).
    const owned: MemcachedOwned = { value, cas: casOf(reply) }
    return owned as unknown as OwnedToken
  }

  async deleteOwned(key: string, token: OwnedToken): Promise<void> {
    const owned = token as unknown as MemcachedOwned
    let cas: MemcachedCas = owned.cas
    // One CAS delete while the add's connection is open (see #onConnection); otherwise compare the value first.
    if (!this.#onConnection(cas.socket)) {
      const read = this.#readReply('gets', await this.#read('gets', key))
      if (!read?.value.equals(owned.value)) return
      cas = casOf(read)
    }
    const deleting = this.#casDelete(key, cas)
    if (deleting) this.#casOutcome('cas delete', (await deleting).status)
  }

  async delete(key: string): Promise<boolean> {
    const reply = await this.#connection.request('delete', OPCODE.delete, key, NO_BYTES, NO_BYTES)
    return this.#found('delete', reply)
  }

  async touch(key: string, ttlSeconds: number): Promise<boolean> {
    const extras = expiryExtras(memcachedExpiry(ttlSeconds), false)
    const reply = await this.#connection.request('touch', OPCODE.touch, key, extras, NO_BYTES)
    return this.#found('touch', reply)
  }

  async gets(key: string): Promise<{ value: Buffer; cas: CasToken } | null> {
    const reply = this.#readReply('gets', await this.#read('gets', key))
    return reply && { value: reply.value, cas: casOf(reply) as unknown as CasToken }
  }

  async setIfUnchanged(key: string, value: Buffer, ttlSeconds: number, cas: CasToken): Promise<CasOutcome> {
    const { unique, socket } = cas as unknown as MemcachedCas
    this.#assertCas(unique)
    if (!this.#onConnection(socket)) return 'conflict'
    const extras = storeExtras(ttlSeconds)
    const reply = await this.#connection.request('cas', OPCODE.set, key, extras, value, unique)
    return this.#casOutcome('cas', reply.status)
  }

  async deleteIfUnchanged(key: string, cas: CasToken): Promise<CasOutcome> {
    const deleting = this.#casDelete(key, cas as unknown as MemcachedCas)
    return deleting ? this.#casOutcome('cas delete', (await deleting).status) : 'conflict'
  }

  /** The CAS delete's request, or undefined when the CAS no longer means anything here (a 'conflict'). */
  #casDelete(key: string, { unique, socket }: MemcachedCas): Promise<MemcachedReply> | undefined {
    this.#assertCas(unique)
    if (!this.#onConnection(socket)) return undefined
    return this.#connection.request('cas delete', OPCODE.delete, key, NO_BYTES, NO_BYTES, unique)
  }

  async ping(): Promise<void> {
    await this.get(this.#probeKey)
  }

  async close(): Promise<void> {
    this.#connection.close()
  }

  #read(operation: string, key: string): Promise<MemcachedReply> {
    return this.#connection.request(operation, OPCODE.get, key, NO_BYTES, NO_BYTES)
  }

  /** A read's reply, null when the key is absent. */
  #readReply(operation: string, reply: MemcachedReply): MemcachedReply | null {
    return this.#found(operation, reply) ? reply : null
  }

  /** True for a reply that found its key, false for one that did not; any other status is a refusal. */
  #found(operation: string, reply: MemcachedReply): boolean {
    if (reply.status === STATUS.notFound) return false
    if (reply.status !== STATUS.ok) throw this.#rejected(operation, reply.status)
    return true
  }

  #add(key: string, value: Buffer, ttlSeconds: number): Promise<MemcachedReply> {
    return this.#connection.request('add', OPCODE.add, key, storeExtras(ttlSeconds), value)
  }

  /** add()'s reply when stored, null when the key was present. */
  #addReply(reply: MemcachedReply): MemcachedReply | null {
    if (reply.status === STATUS.exists) return null
    if (reply.status !== STATUS.ok) throw this.#rejected('add', reply.status)
    return reply
  }

  /**
   * Whether a CAS read or added through `socket` still means what it meant: only while that connection is open,
   * to the same server process (a restart closes every connection, and the new process counts CAS from 1 again,
   * so an old one could match another writer's value).
   */
  #onConnection(socket: Socket | undefined): boolean {
    return socket !== undefined && socket === this.#connection.socket && !socket.destroyed
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
    const meaning = STATUS_NAMES[status]
    return new NodeRejectedError(
      `${this.address} refused ${operation}: status 0x${status.toString(16)}${meaning ? ` (${meaning})` : ''}`,
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

/** A reply's CAS (copied out of the read buffer), with the connection the reply came on. */
function casOf(reply: MemcachedReply): MemcachedCas {
  return { unique: Buffer.from(reply.cas), socket: reply.source }
}

function storeExtras(ttlSeconds: number): Buffer {
  return expiryExtras(memcachedExpiry(ttlSeconds), true)
}
