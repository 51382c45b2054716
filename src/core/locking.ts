import { randomBytes } from 'node:crypto'
import { setImmediate } from 'node:timers'
import { AllNodesDownError, ClosedError, LockTimeoutError, NodeRejectedError } from '../errors.js'
import type { OwnedToken } from '../nodes/node.js'
import type { NodeRing } from '../nodes/ring.js'

export interface LockOptions {
  /** Seconds a lock lives in memcached: how long a holder that died blocks the session. */
  readonly lockExpirationSeconds: number
  /** Milliseconds a request waits for the lock before LockTimeoutError. */
  readonly lockTimeoutMs: number
  /** The longest a node operation takes (operationTimeout): a write begun while the lock held must end in it. */
  readonly operationTimeoutMs: number
  readonly retryAfterSeconds: number
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

/** The request's place in this process's queue of the session. */
interface QueuePlace {
  /** Lets the next request of the session go. */
  readonly leave: () => void
  /** Whether a request of the session queued behind this one. */
  readonly followed: () => boolean
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
  /** Per session, the promise the next local request waits for. */
  readonly #queues = new Map<string, Promise<void>>()
  /** Locks held by requests in this process, released by close() so a shutdown blocks no session. */
  readonly #heldLocks = new Set<SessionLock>()
  /** Per session, a lock its last holder left to the request queued behind it (taken in the same tick). */
  readonly #handoffs = new Map<string, StoredLock>()
  /** Set by releaseAll(): no lock is passed on or taken any more. */
  #closing = false

  constructor(ring: NodeRing, options: LockOptions) {
    this.#ring = ring
    this.#options = options
  }

  /**
   * Waits for the session's lock (in this process, then in memcached); throws LockTimeoutError on timeout.
   * `primaryOf` names the node the session is read from, asked before each add (a request ahead may move it).
   * `besideFirstAdd` is called right after the first add is issued, when it goes to that node and the node
   * applies operations in order: a read it issues then runs after the add, so if that add takes the lock
   * (`byFirstAdd`), the read was made under it, and the two shared one round trip.
   */
  async acquire(
    random: string,
    primaryOf: () => string,
    lockKey: string,
    besideFirstAdd?: () => void,
  ): Promise<SessionLock> {
    const deadline = Date.now() + this.#options.lockTimeoutMs
    const ahead = this.#queues.get(random)
    const previous = ahead ?? Promise.resolve()
    let leaveQueue = (): void => {}
    const mine = new Promise<void>((resolve) => {
      leaveQueue = resolve
    })
    const tail = previous.then(() => mine)
    this.#queues.set(random, tail)
    const done = (): void => {
      leaveQueue()
      if (this.#queues.get(random) === tail) this.#queues.delete(random)
    }

    const place: QueuePlace = {
      leave: done,
      followed: () => {
        const last = this.#queues.get(random)
        return last !== undefined && last !== tail
      },
    }
    try {
      if (ahead && !(await settlesWithin(previous, deadline - Date.now()))) throw this.#timeout()
      if (this.#closing) throw new ClosedError('session-failover was closed; no lock is taken')
      const inherited = this.#handoffs.get(random)
      if (inherited) {
        this.#handoffs.delete(random)
        if (inherited.lockKey === lockKey && inherited.nodeId === this.#lockNode(primaryOf())) {
          return this.#held(random, inherited, place, true, false)
        }
        // The session moved since it was locked: that lock goes, and one is taken where the session is now.
        await this.#delete(inherited)
      }
      const token = `${PROCESS_TOKEN}.${(issued++).toString(36)}`
      const taken = await this.#addLock(primaryOf, lockKey, token, deadline, besideFirstAdd)
      const waited = ahead !== undefined || taken.busy > 0
      return this.#held(random, { ...taken, lockKey, token }, place, waited, taken.first)
    } catch (error) {
      done()
      throw error
    }
  }

  async #addLock(
    primaryOf: () => string,
    lockKey: string,
    token: string,
    deadline: number,
    besideFirstAdd: (() => void) | undefined,
  ): Promise<{ nodeId: string; owned: OwnedToken; sentAt: number; busy: number; first: boolean }> {
    const value = Buffer.from(token)
    // Tries that found the lock taken by another request (a dead node's failed add does not count).
    let busy = 0
    for (let pause = FIRST_PAUSE_MS, attempt = 0; ; pause = Math.min(MAX_PAUSE_MS, pause * 1.5), attempt++) {
      const primaryNodeId = primaryOf()
      const nodeId = this.#lockNode(primaryNodeId)
      if (!nodeId)
        throw new AllNodesDownError(
          'No session node is reachable to lock the session',
          this.#options.retryAfterSeconds,
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
        if (owned) return { nodeId, owned, sentAt, busy, first: beside }
        busy++
      } catch (error) {
        if (error instanceof NodeRejectedError || error instanceof ClosedError) throw error
        // The node is marked dead now; the next pass locks where the session moves to. The add may still have
        // been applied (a frozen node runs it when it resumes): that lock is removed before the node is back.
        this.#ring.deleteWhenBack(nodeId, lockKey, value)
        if (Date.now() >= deadline) throw this.#timeout()
        continue
      }
      const wait = pause * (0.5 + Math.random())
      if (Date.now() + wait >= deadline) throw this.#timeout()
      await new Promise((resolve) => setTimeout(resolve, wait))
    }
  }

  #held(
    random: string,
    stored: StoredLock,
    { leave, followed }: QueuePlace,
    waited: boolean,
    byFirstAdd: boolean,
  ): SessionLock {
    const { nodeId, sentAt } = stored
    let held = true
    let releasing: Promise<void> | undefined
    // memcached counts expiry in whole seconds, so the lock may go up to a second early, counted from when the
    // add was sent; a write begun while held must also finish in time. Past that the lock counts as lost, and
    // the local queue stops waiting on this request.
    const lifetimeMs =
      (this.#options.lockExpirationSeconds - 1) * 1000 - this.#options.operationTimeoutMs - 100
    const handoffAgeMs = Math.min(HANDOFF_MAX_AGE_MS, lifetimeMs / 2)
    const expiry = setTimeout(
      () => {
        held = false
        leave()
      },
      Math.max(0, sentAt + lifetimeMs - Date.now()),
    )
    expiry.unref()
    const release = (): Promise<void> => {
      releasing ??= (async () => {
        this.#heldLocks.delete(lock)
        clearTimeout(expiry)
        const stillMine = held
        held = false
        // Left to the request of this process queued behind: it holds the lock without a delete and an add, and
        // a round trip sooner. Only a young lock, so other instances' requests of the session get their turn,
        // on a node not marked dead since it was added (one that came back may have lost it), and not while
        // shutting down.
        const age = Date.now() - sentAt
        const queued = followed()
        if (
          stillMine &&
          queued &&
          age < handoffAgeMs &&
          this.#ring.aliveSince(nodeId, sentAt) &&
          !this.#closing
        ) {
          this.#handoffs.set(random, stored)
          leave()
          // The request behind takes it in this tick's microtasks; one that gave up meanwhile takes nothing.
          setImmediate(() => {
            if (this.#handoffs.get(random) !== stored) return
            this.#handoffs.delete(random)
            void this.#delete(stored)
          })
          return
        }
        try {
          if (!stillMine) return
          const deleting = this.#delete(stored)
          // A request of the session that comes next may go now: its add leaves behind this delete on the same
          // connection, and the node applies them in that order.
          if (!queued && !this.#closing && this.#ring.isOrdered(nodeId)) leave()
          await deleting
          // Passed on for a second already: requests of the session on other instances, which poll for it, get
          // a window to take it before the one queued here adds it again.
          if (queued && age >= handoffAgeMs) await new Promise((resolve) => setTimeout(resolve, FAIR_TURN_MS))
        } finally {
          leave()
        }
      })()
      return releasing
    }
    const ring = this.#ring
    const lock: SessionLock = {
      // Another instance locks on the next node once this one is dead: then this lock protects nothing.
      get held() {
        return held && ring.isAlive(nodeId)
      },
      waited,
      byFirstAdd,
      release,
    }
    this.#heldLocks.add(lock)
    return lock
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
  async #delete({ nodeId, lockKey, token, owned }: StoredLock): Promise<void> {
    try {
      if (!this.#ring.isAlive(nodeId)) this.#ring.deleteWhenBack(nodeId, lockKey, Buffer.from(token))
      else await this.#ring.call(nodeId, (node) => node.deleteOwned(lockKey, owned))
    } catch {
      this.#ring.deleteWhenBack(nodeId, lockKey, Buffer.from(token))
    }
  }

  #timeout(): LockTimeoutError {
    return new LockTimeoutError(
      `The session is locked by another request and its lock was not free within ${this.#options.lockTimeoutMs} ms`,
      this.#options.retryAfterSeconds,
    )
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
