import type { Socket } from 'node:net'
import { NodeOperationError, NodeRejectedError } from '../errors.js'
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
const OUT_OF_MEMORY = 0x82

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

  // Each operation is its request's promise and one .then() with a reader of the reply made once per node: an
  // async frame instead would allocate about 450 B more on every node operation (bench:profile --alloc
  // --no-inlining). What throws before its request leaves throws, not rejects: every caller makes the call
  // inside NodeRing.call(), a .then() or an async function, where it becomes a rejection all the same.

  get(key: string): Promise<Buffer | null> {
    return this.#read('get', key).then(this.#value)
  }

  set(key: string, value: Buffer, ttlSeconds: number): Promise<void> {
    return this.#set(key, value, ttlSeconds, false)
  }

  #set(key: string, value: Buffer, ttlSeconds: number, waited: boolean): Promise<void> {
    const check = this.#sizeCheck(key, value, waited)
    if (check) return check.then(() => this.#set(key, value, ttlSeconds, true))
    return this.#connection.request('set', OPCODE.set, key, storeExtras(ttlSeconds), value).then(this.#stored)
  }

  add(key: string, value: Buffer, ttlSeconds: number): Promise<boolean> {
    return this.#add(key, value, ttlSeconds).then(this.#added)
  }

  addOwned(key: string, value: Buffer, ttlSeconds: number): Promise<OwnedToken | null> {
    return this.#add(key, value, ttlSeconds).then((reply) => {
      if (!this.#added(reply)) return null
      // The reply's CAS deletes exactly this value for as long as its connection stays open (see #onConnection).
      const owned: MemcachedOwned = { value, cas: casOf(reply) }
      return owned as unknown as OwnedToken
    })
  }

  deleteOwned(key: string, token: OwnedToken): Promise<void> {
    const owned = token as unknown as MemcachedOwned
    // One CAS delete while the add's connection is open (see #onConnection); otherwise compare the value first.
    if (this.#onConnection(owned.cas.socket)) return this.#deleteIfUnchanged(key, owned.cas).then(ignore)
    return this.#read('gets', key).then(async (reply) => {
      if (this.#found('gets', reply) && reply.value.equals(owned.value)) {
        await this.#deleteIfUnchanged(key, casOf(reply))
      }
    })
  }

  delete(key: string): Promise<boolean> {
    return this.#connection.request('delete', OPCODE.delete, key, NO_BYTES, NO_BYTES).then(this.#deleted)
  }

  touch(key: string, ttlSeconds: number): Promise<boolean> {
    const extras = expiryExtras(memcachedExpiry(ttlSeconds), false)
    return this.#connection.request('touch', OPCODE.touch, key, extras, NO_BYTES).then(this.#touched)
  }

  gets(key: string): Promise<{ value: Buffer; cas: CasToken } | null> {
    return this.#read('gets', key).then(this.#valueAndCas)
  }

  setIfUnchanged(key: string, value: Buffer, ttlSeconds: number, cas: CasToken): Promise<CasOutcome> {
    return this.#setIfUnchanged(key, value, ttlSeconds, cas, false)
  }

  #setIfUnchanged(
    key: string,
    value: Buffer,
    ttlSeconds: number,
    cas: CasToken,
    waited: boolean,
  ): Promise<CasOutcome> {
    const { unique, socket } = cas as unknown as MemcachedCas
    if (casDisabled(unique)) return Promise.reject(this.#casDisabled())
    if (!this.#onConnection(socket)) return CONFLICT
    const check = this.#sizeCheck(key, value, waited)
    if (check) return check.then(() => this.#setIfUnchanged(key, value, ttlSeconds, cas, true))
    const extras = storeExtras(ttlSeconds)
    return this.#connection.request('cas', OPCODE.set, key, extras, value, unique).then(this.#casSet)
  }

  deleteIfUnchanged(key: string, cas: CasToken): Promise<CasOutcome> {
    return this.#deleteIfUnchanged(key, cas as unknown as MemcachedCas)
  }

  #deleteIfUnchanged(key: string, { unique, socket }: MemcachedCas): Promise<CasOutcome> {
    if (casDisabled(unique)) return Promise.reject(this.#casDisabled())
    if (!this.#onConnection(socket)) return CONFLICT
    return this.#connection
      .request('cas delete', OPCODE.delete, key, NO_BYTES, NO_BYTES, unique)
      .then(this.#casDeleted)
  }

  // The readers of replies, made once per node.
  readonly #value = (reply: MemcachedReply): Buffer | null =>
    // No copy: the reply is a view of a buffer nothing writes into again, and the codec copies what it keeps.
    this.#found('get', reply) ? reply.value : null
  readonly #valueAndCas = (reply: MemcachedReply): { value: Buffer; cas: CasToken } | null =>
    this.#found('gets', reply) ? { value: reply.value, cas: casOf(reply) as unknown as CasToken } : null
  readonly #stored = (reply: MemcachedReply): void => {
    if (reply.status !== STATUS.ok) throw this.#rejected('set', reply.status)
  }
  readonly #deleted = (reply: MemcachedReply): boolean => this.#found('delete', reply)
  readonly #touched = (reply: MemcachedReply): boolean => this.#found('touch', reply)
  readonly #casSet = (reply: MemcachedReply): CasOutcome => this.#casOutcome('cas', reply.status)
  readonly #casDeleted = (reply: MemcachedReply): CasOutcome => this.#casOutcome('cas delete', reply.status)

  /** add(): true when stored, false when the key was present. */
  readonly #added = (reply: MemcachedReply): boolean => {
    if (reply.status === STATUS.exists) return false
    if (reply.status !== STATUS.ok) throw this.#rejected('add', reply.status)
    return true
  }

  largestValue(keyBytes: number): number | undefined {
    return this.#connection.largestValueKnown(keyBytes)
  }

  /**
   * Undefined when `value` may be sent. A value larger than the server stores is refused unsent: memcached would
   * refuse it too, and delete what is stored under the key (the session's last good copy). Until the connection
   * has learned the limit, a promise to wait for it, once: `waited` sends the value then whatever was learned.
   * If the connection failed first, the promise rejects with its failure: the node is failing, and a write sent on
   * a new connection would wait a second timeout.
   */
  #sizeCheck(key: string, value: Buffer, waited: boolean): Promise<void> | undefined {
    const keyBytes = Buffer.byteLength(key)
    const limit = this.#connection.largestValue(keyBytes)
    if (typeof limit !== 'number') {
      if (waited) return undefined
      return limit.then((failure) => {
        if (failure) throw failure
      })
    }
    if (value.length <= limit) return undefined
    return Promise.reject(
      new NodeRejectedError(
        `${this.address} stores values of at most ${limit} bytes under this key (its item size, memcached -I): ` +
          `a value of ${value.length} bytes was not sent, and what the key holds is unchanged`,
      ),
    )
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

  /** True for a reply that found its key, false for one that did not; any other status is a refusal. */
  #found(operation: string, reply: MemcachedReply): boolean {
    if (reply.status === STATUS.notFound) return false
    if (reply.status !== STATUS.ok) throw this.#rejected(operation, reply.status)
    return true
  }

  #add(key: string, value: Buffer, ttlSeconds: number): Promise<MemcachedReply> {
    return this.#connection.request('add', OPCODE.add, key, storeExtras(ttlSeconds), value)
  }

  /**
   * Whether a CAS read or added through `socket` still means what it meant: only while that connection is open,
   * to the same server process (a restart closes every connection, and the new process counts CAS from 1 again,
   * so an old one could match another writer's value).
   */
  #onConnection(socket: Socket | undefined): boolean {
    return socket !== undefined && socket === this.#connection.socket && !socket.destroyed
  }

  /** Why a compare-and-set is not sent when the CAS is 0 (see casDisabled). */
  #casDisabled(): NodeRejectedError {
    return new NodeRejectedError(
      `${this.address} has compare-and-set disabled (memcached -C); locking and merges need it: start memcached without -C, or use lockingMode 'none'`,
    )
  }

  #casOutcome(operation: string, status: number): CasOutcome {
    if (status === STATUS.ok) return 'stored'
    if (status === STATUS.exists) return 'conflict'
    if (status === STATUS.notFound) return 'missing'
    throw this.#rejected(operation, status)
  }

  #rejected(operation: string, status: number): NodeRejectedError | NodeOperationError {
    const meaning = STATUS_NAMES[status]
    const message = `${this.address} refused ${operation}: status 0x${status.toString(16)}${meaning ? ` (${meaning})` : ''}`
    // Out of memory (a full memcached that may not evict, `-M`) refuses every write, not this one: the node is
    // unavailable, so its sessions fail over rather than fail, as a Redis node's OOM does.
    return status === OUT_OF_MEMORY ? new NodeOperationError(message) : new NodeRejectedError(message)
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

/** What a compare-and-set answers without asking the node: the CAS was read through another connection. */
const CONFLICT: Promise<CasOutcome> = Promise.resolve('conflict')

const ignore = (): void => {}

/** memcached started with -C answers CAS 0, and a write with CAS 0 is unconditional: it must not be sent. */
function casDisabled(unique: Buffer): boolean {
  for (const byte of unique) if (byte !== 0) return false
  return true
}

/** A reply's CAS, with the connection the reply came on. */
function casOf(reply: MemcachedReply): MemcachedCas {
  return { unique: reply.copyCas(), socket: reply.source }
}

function storeExtras(ttlSeconds: number): Buffer {
  return expiryExtras(memcachedExpiry(ttlSeconds), true)
}
