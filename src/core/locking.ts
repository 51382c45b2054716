import { randomBytes } from 'node:crypto'
import { setImmediate } from 'node:timers'
import { AllNodesDownError, ClosedError, LockTimeoutError, NodeRejectedError } from '../errors.js'
import type { OwnedToken } from '../nodes/node.js'
import type { NodeRing } from '../nodes/ring.js'
import { SessionQueues, type Turn } from './session-queue.js'

export interface LockOptions {
  /** Seconds a lock lives in memcached: how long a holder that died blocks the session. */
  readonly lockExpirationSeconds: number
  /** Milliseconds a request waits for the lock before LockTimeoutError. */
  readonly lockTimeoutMs: number
  /** The longest a node operation takes (operationTimeout): a write begun while the lock held must end in it. */
  readonly operationTimeoutMs: number
  /** Retry-After of a LockTimeoutError: locks are held for one request. */
  readonly retryAfterSeconds: number
  /** Retry-After of an AllNodesDownError, as the store gives it: until the nodes' next probe. */
  readonly nodesDownRetryAfterSeconds: number
}

/** A held session lock. */
export interface SessionLock {
  /** False once released, or once it expired while the request was still running. */
  readonly held: boolean
  /** Whether acquiring it had to wait for another request of the session. */
  readonly waited: boolean
  /**
   * Taken by the first add sent, the one `acquire`'s `besideFirstAdd` was called right after: what that call
   * read, it read under this lock.
   */
  readonly byFirstAdd: boolean
  /** Releases it, in memcached only if this request still owns it. Idempotent; never rejects. */
  release(): Promise<void>
}

/**
 * A lock's value only has to differ from every other holder's (it tells the owner's lock apart when released by
 * comparing values), not be unpredictable: a random part per process, then a counter.
 */
const PROCESS_TOKEN = randomBytes(12).toString('base64url')
/** What a release that has nothing to wait for returns: one promise for all of them. */
const DONE: Promise<void> = Promise.resolve()
/** Lock values issued in this process, by every LockManager (several apps may share a process). */
let issued = 0

/**
 * A lock is passed from a request to the next one of this process waiting for it only while younger than this:
 * requests of the session on other instances, which poll for it, wait no longer than that for their turn.
 */
const HANDOFF_MAX_AGE_MS = 1000

/** A lock as stored: where, under which key, with which value, and when its add was sent. */
interface StoredLock {
  readonly nodeId: string
  readonly lockKey: string
  readonly token: string
  readonly owned: OwnedToken
  readonly sentAt: number
}

/** What one request asks acquire() for, with its place in the session's queue in this process. */
interface LockRequest {
  readonly random: string
  readonly turn: Turn
  readonly primaryOf: () => string
  readonly lockKey: string
  readonly deadline: number
  readonly besideFirstAdd: (() => void) | undefined
}

/** Waiting for the lock polls memcached with growing pauses, from FIRST_PAUSE_MS up to MAX_PAUSE_MS. */
const FIRST_PAUSE_MS = 4
const MAX_PAUSE_MS = 50
/** Longer than the longest pause between polls (MAX_PAUSE_MS, jittered up to 1.5 times): a poll lands in it. */
const FAIR_TURN_MS = 2 * MAX_PAUSE_MS

/**
 * Session locks for non-sticky mode. In this process, requests of one session wait in one queue, so only the
 * request at its head polls memcached. Across processes the lock is a memcached key added with `add` (it
 * succeeds for one request only) holding a random token and an expiry, on the node that holds the session (or,
 * when that node is dead, where the session moves to, so every instance agrees). It is released only by its
 * owner, with a compare-and-set delete: a request whose lock expired cannot delete the next owner's lock.
 */
export class LockManager {
  readonly #ring: NodeRing
  readonly #options: LockOptions
  /** Requests of each session in this process: only the one at the head takes the lock. */
  readonly #queues = new SessionQueues()
  /** Locks held by requests in this process, released by close() so a shutdown blocks no session. */
  readonly #heldLocks = new Set<SessionLock>()
  /** Per session, a lock its last holder left to the request queued behind it (taken in the same tick). */
  readonly #handoffs = new Map<string, StoredLock>()
  /** Set by releaseAll(): no lock is passed on or taken any more. */
  #closing = false

  /**
   * How long a lock counts as held, from when its add was sent. memcached counts expiry in whole seconds, so the
   * lock may go up to a second early, and a write begun while held must also finish in time. Past that the lock
   * counts as lost, and the local queue stops waiting on its request.
   */
  readonly #lifetimeMs: number
  /** A lock is passed on locally only while younger than this (HANDOFF_MAX_AGE_MS, or less for short locks). */
  readonly #handoffAgeMs: number

  constructor(ring: NodeRing, options: LockOptions) {
    this.#ring = ring
    this.#options = options
    this.#lifetimeMs = (options.lockExpirationSeconds - 1) * 1000 - options.operationTimeoutMs - 100
    this.#handoffAgeMs = Math.min(HANDOFF_MAX_AGE_MS, this.#lifetimeMs / 2)
  }

  /**
   * Waits for the session's lock (in this process, then in memcached); throws LockTimeoutError on timeout.
   * `primaryOf` names the node the session is read from, asked before each add (a request ahead may move it).
   * `besideFirstAdd` is called right after the first add is issued, when it goes to that node and the node
   * applies operations in order: a read it issues then runs after the add, so if that add takes the lock
   * (`byFirstAdd`), the read was made under it, and the two shared one round trip.
   */
  acquire(
    random: string,
    primaryOf: () => string,
    lockKey: string,
    besideFirstAdd?: () => void,
  ): Promise<SessionLock> {
    const turn = this.#queues.join(random)
    // On the monotonic clock, as every wait below: a step of the wall clock must not stretch lockTimeout.
    const deadline = performance.now() + this.#options.lockTimeoutMs
    const asked: LockRequest = { random, turn, primaryOf, lockKey, deadline, besideFirstAdd }
    // Most requests find no request of their session ahead in this process, and no lock left to them: they go
    // straight to the add, one async frame fewer on every locked request.
    if (turn.ready === undefined && !this.#closing && !this.#handoffs.has(random)) return this.#addLock(asked)
    return this.#afterTurn(asked)
  }

  /** acquire() for a request that waits for its turn in this process, or may inherit a lock. */
  async #afterTurn(asked: LockRequest): Promise<SessionLock> {
    const { random, turn, primaryOf, lockKey, deadline } = asked
    try {
      if (turn.ready && !(await settlesWithin(turn.ready, deadline - performance.now())))
        throw this.#timeout()
      if (this.#closing) throw new ClosedError('session-failover was closed; no lock is taken')
      const inherited = this.#handoffs.get(random)
      if (inherited) {
        this.#handoffs.delete(random)
        if (inherited.lockKey === lockKey && inherited.nodeId === this.#lockNode(primaryOf())) {
          return this.#held(random, inherited, turn, true, false)
        }
        // The session moved since it was locked: that lock goes, and one is taken where the session is now.
        await this.#delete(inherited)
      }
    } catch (error) {
      turn.leave()
      throw error
    }
    return await this.#addLock(asked)
  }

  /** Adds the lock in memcached, polling while another request holds it; leaves the turn if it fails. */
  async #addLock({
    random,
    turn,
    primaryOf,
    lockKey,
    deadline,
    besideFirstAdd,
  }: LockRequest): Promise<SessionLock> {
    const token = `${PROCESS_TOKEN}.${(issued++).toString(36)}`
    const value = Buffer.from(token)
    // Tries that found the lock taken by another request (a dead node's failed add does not count).
    let busy = 0
    try {
      for (
        let pause = FIRST_PAUSE_MS, attempt = 0;
        ;
        pause = Math.min(MAX_PAUSE_MS, pause * 1.5), attempt++
      ) {
        const primaryNodeId = primaryOf()
        const nodeId = this.#lockNode(primaryNodeId)
        if (!nodeId)
          throw new AllNodesDownError(
            'No session node is reachable to lock the session',
            this.#options.nodesDownRetryAfterSeconds,
          )
        const sentAt = Date.now()
        const adding = this.#ring.call(nodeId, (node) =>
          node.addOwned(lockKey, value, this.#options.lockExpirationSeconds),
        )
        const beside =
          attempt === 0 &&
          besideFirstAdd !== undefined &&
          nodeId === primaryNodeId &&
          this.#ring.isOrdered(nodeId)
        if (beside) besideFirstAdd()
        try {
          const owned = await adding
          if (owned) {
            const stored = { nodeId, lockKey, token, owned, sentAt }
            return this.#held(random, stored, turn, turn.ready !== undefined || busy > 0, beside)
          }
          busy++
        } catch (error) {
          if (error instanceof NodeRejectedError || error instanceof ClosedError) throw error
          // The node is marked dead now; the next pass locks where the session moves to. The add may still have
          // been applied (a frozen node runs it when it resumes): that lock is removed before the node is back.
          this.#ring.deleteWhenBack(nodeId, lockKey, value)
          if (performance.now() >= deadline) throw this.#timeout()
          continue
        }
        const wait = pause * (0.5 + Math.random())
        if (performance.now() + wait >= deadline) throw this.#timeout()
        await new Promise((resolve) => setTimeout(resolve, wait))
      }
    } catch (error) {
      turn.leave()
      throw error
    }
  }

  #held(random: string, stored: StoredLock, turn: Turn, waited: boolean, byFirstAdd: boolean): SessionLock {
    const expiresInMs = Math.max(0, stored.sentAt + this.#lifetimeMs - Date.now())
    const lock = new HeldLock(
      this.#ring,
      this.#release,
      random,
      stored,
      turn,
      waited,
      byFirstAdd,
      expiresInMs,
    )
    this.#heldLocks.add(lock)
    return lock
  }

  /**
   * HeldLock.release(), once per lock; made once per manager, so a lock keeps no closure of its own. Not an async
   * function: most releases return the delete's own promise (see #delete).
   */
  readonly #release = (lock: HeldLock): Promise<void> => {
    const { random, stored, turn } = lock
    const { nodeId, sentAt } = stored
    this.#heldLocks.delete(lock)
    clearTimeout(lock.expiry)
    const stillMine = lock.mine
    lock.mine = false
    // Left to the request of this process queued behind: it holds the lock without a delete and an add, and
    // a round trip sooner. Only a young lock, so other instances' requests of the session get their turn,
    // on a node not marked dead since it was added (one that came back may have lost it), and not while
    // shutting down.
    const age = Date.now() - sentAt
    const queued = turn.followed()
    if (
      stillMine &&
      queued &&
      age < this.#handoffAgeMs &&
      this.#ring.aliveSince(nodeId, sentAt) &&
      !this.#closing
    ) {
      this.#handoffs.set(random, stored)
      turn.leave()
      // The request behind takes it in this tick's microtasks; one that gave up meanwhile takes nothing.
      setImmediate(() => {
        if (this.#handoffs.get(random) !== stored) return
        this.#handoffs.delete(random)
        void this.#delete(stored)
      })
      return DONE
    }
    if (!stillMine) {
      turn.leave()
      return DONE
    }
    const deleting = this.#delete(stored)
    // A request of the session that comes next may go now: its add leaves behind this delete on the same
    // connection, and the node applies them in that order.
    if (!queued && !this.#closing && this.#ring.isOrdered(nodeId)) {
      turn.leave()
      return deleting
    }
    return leaveAfter(deleting, turn, queued && age >= this.#handoffAgeMs)
  }

  #lockNode(primaryNodeId: string): string | undefined {
    return this.#ring.isAlive(primaryNodeId) ? primaryNodeId : this.#ring.nextAliveAfter(primaryNodeId)
  }

  /** Releases every lock requests of this process still hold, or left to one another (shutdown). */
  async releaseAll(): Promise<void> {
    this.#closing = true
    await Promise.all([...this.#heldLocks].map((lock) => lock.release()))
    const left = [...this.#handoffs.values()]
    this.#handoffs.clear()
    await Promise.all(left.map((stored) => this.#delete(stored)))
  }

  /**
   * Deletes a lock this process holds, only if it is still this one. Never rejects: a node known dead is not
   * waited on (a frozen one would hold up the next request), and an unreachable one has the lock deleted when
   * it is back (or it expires by itself).
   */
  #delete(stored: StoredLock): Promise<void> {
    if (!this.#ring.isAlive(stored.nodeId)) {
      this.#deleteWhenBack(stored)
      return DONE
    }
    return this.#ring
      .call(stored.nodeId, (node) => node.deleteOwned(stored.lockKey, stored.owned))
      .then(undefined, () => this.#deleteWhenBack(stored))
  }

  #deleteWhenBack({ nodeId, lockKey, token }: StoredLock): void {
    this.#ring.deleteWhenBack(nodeId, lockKey, Buffer.from(token))
  }

  #timeout(): LockTimeoutError {
    return new LockTimeoutError(
      `The session is locked by another request and its lock was not free within ${this.#options.lockTimeoutMs} ms`,
      this.#options.retryAfterSeconds,
    )
  }
}

/** A lock held by a request of this process. */
class HeldLock implements SessionLock {
  readonly waited: boolean
  readonly byFirstAdd: boolean
  readonly random: string
  readonly stored: StoredLock
  readonly turn: Turn
  readonly expiry: NodeJS.Timeout
  /** False once released, or once its lifetime is over. */
  mine = true
  readonly #ring: NodeRing
  readonly #release: (lock: HeldLock) => Promise<void>
  #releasing: Promise<void> | undefined

  constructor(
    ring: NodeRing,
    release: (lock: HeldLock) => Promise<void>,
    random: string,
    stored: StoredLock,
    turn: Turn,
    waited: boolean,
    byFirstAdd: boolean,
    expiresInMs: number,
  ) {
    this.#ring = ring
    this.#release = release
    this.random = random
    this.stored = stored
    this.turn = turn
    this.waited = waited
    this.byFirstAdd = byFirstAdd
    this.expiry = setTimeout(expire, expiresInMs, this)
    this.expiry.unref()
  }

  // Another instance locks on the next node once this one is dead: then this lock protects nothing.
  get held(): boolean {
    return this.mine && this.#ring.isAlive(this.stored.nodeId)
  }

  release(): Promise<void> {
    this.#releasing ??= this.#release(this)
    return this.#releasing
  }
}

/** A lock's lifetime is over: it counts as lost, and the next request of its session in this process may go. */
function expire(lock: HeldLock): void {
  lock.mine = false
  lock.turn.leave()
}

/**
 * Lets the session's next request of this process go once the lock's delete is answered; with `fairTurn`, a
 * lock passed on for a second already, only after a pause: requests of the session on other instances, which
 * poll for it, get a window to take it before the one queued here adds it again.
 */
async function leaveAfter(deleting: Promise<void>, turn: Turn, fairTurn: boolean): Promise<void> {
  try {
    await deleting
    if (fairTurn) await new Promise((resolve) => setTimeout(resolve, FAIR_TURN_MS))
  } finally {
    turn.leave()
  }
}

/** Whether `promise` settles within `ms`. */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  if (ms <= 0) return false
  let timer: NodeJS.Timeout | undefined
  const timedOut = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms)
  })
  try {
    return await Promise.race([promise.then(() => true), timedOut])
  } finally {
    clearTimeout(timer)
  }
}
