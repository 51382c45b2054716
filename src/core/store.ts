import { hash } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import {
  AllNodesDownError,
  ConcurrentUpdateError,
  CorruptSessionError,
  ForeignRecordError,
  type LateWrite,
  NodeOperationError,
  NodeRejectedError,
  OperationTimeoutError,
  SessionTooLargeError,
  StaleWriteError,
  UnserializableSessionError,
} from '../errors.js'
import type { Logger } from '../logger.js'
import type { CasToken } from '../nodes/node.js'
import type { NodeRing } from '../nodes/ring.js'
import { formatSessionId, newRandomPart, type ParsedSessionId, parseSessionId } from '../session-id.js'
import type { SessionBackend } from './backend.js'
import { type RecordCodec, type SessionRecord, sameBlob } from './codec.js'
import { type StorageKeys, storageKeys } from './keys.js'
import { applyChanges, type SessionChanges } from './merge.js'
import type { Metrics } from './metrics.js'
import type { SessionSerializer } from './serializer.js'

export interface StoreOptions {
  readonly prefix: string
  /** Fraction of the TTL after which an unchanged session's expiry is refreshed with a touch. */
  readonly touchAfter: number
  /** How often (per session, per instance) a read verifies that the backup copy still exists. */
  readonly backupCheckIntervalMs: number
  /** Seconds a client is told to wait (Retry-After) when no node is alive. */
  readonly retryAfterSeconds: number
  readonly logger: Logger
  /** Signs (and optionally encrypts) what is stored, and verifies what is read. */
  readonly codec: RecordCodec
  /** Largest stored record, in bytes; a larger session is refused before anything is written. */
  readonly maxSessionBytes: number
  /** How long after a destroy its deletes are made again, for a write that was under way (see destroy()). */
  readonly repeatDeleteAfterMs: number
  /** The configured data format, for merges. */
  readonly serializer: SessionSerializer
  readonly metrics: Metrics
}

export interface LoadedSession {
  /** The id to use from now on: differs from the requested one when the session was relocated. */
  readonly id: string
  readonly record: SessionRecord
  /** True when the copy came from a backup and must be written back (restored or relocated) this request. */
  readonly mustWrite: boolean
  /** The dead node the session moved away from, when it was relocated. */
  readonly relocatedFrom: string | undefined
  /** The id presented named a node this instance had moved the session off: loaded under the new id. */
  readonly followedMove?: true
  /** The primary copy's compare-and-set token, when it was read from the primary: lets a write be conditional. */
  readonly cas?: { readonly nodeId: string; readonly token: CasToken }
}

const ignore = (): void => {}

/** The value of a sticky logout's mark (StorageKeys.gone): its presence is what counts. */
const GONE_MARK = Buffer.from('1')
/** Rounds of read-apply-write a merge tries before giving up under contention. */
const MAX_MERGE_ATTEMPTS = 12

interface FreshestCopy {
  readonly record: SessionRecord | undefined
  /** How many nodes answered the reads. */
  readonly answered: number
  /** A copy was skipped that another instance may read (another key, another format). */
  readonly foreign: boolean
  /** The bytes of `record` as stored (a view of the read buffer). */
  readonly blob: Buffer | undefined
}

/** A move a load chose: from the node the id names to `to`, with a test for the copy left on the old node. */
interface ChosenMove {
  readonly from: string
  readonly to: string
  readonly copyBefore: (stored: Buffer) => boolean
}

/**
 * Whether `a` was written after `b`: a higher version, or (two instances that started from the same version)
 * the later write.
 */
export function isNewer(a: SessionRecord, b: SessionRecord): boolean {
  return a.version > b.version || (a.version === b.version && a.writtenAt > b.writtenAt)
}

/** How many recently refreshed sessions are remembered, so each instance touches a session at most once per window. */
const TOUCH_LOG_ENTRIES = 50_000

/**
 * Ids found on no node (expired, destroyed) are remembered briefly: a client replaying such a cookie costs no
 * read of every node on each request. Bounded in count; brief, because a node that was unreachable may
 * come back holding the session.
 */
const ABSENT_ENTRIES = 10_000
const ABSENT_TTL_MS = 10_000

/**
 * Where sessions this instance moved off a dead node now live, so a request that still presents the old id (sent
 * before its client had the new cookie, or from a client that ignores Set-Cookie) reads the session where it is
 * instead of relocating it again. Bounded in count; long-lived, because a node that comes back may still hold
 * the copy from before the move.
 */
const MOVES_REMEMBERED = 20_000
const MOVES_TTL_MS = 60 * 60 * 1000

/** Where one copy of a session is kept: a node, and the key on it (the primary's or the backup's). */
interface CopyAt {
  readonly nodeId: string
  readonly key: string
}

/**
 * Sessions replicated on two nodes: the primary named in the session id and a backup on the next alive node.
 * Framework-free: it deals in session ids and records, never in requests.
 */
export class ReplicatedStore implements SessionBackend {
  readonly #ring: NodeRing
  readonly #options: StoreOptions
  readonly #lastRefresh = new LRUCache<string, number>({ max: TOUCH_LOG_ENTRIES })
  readonly #lastBackupCheck = new LRUCache<string, number>({ max: TOUCH_LOG_ENTRIES })
  readonly #absent = new LRUCache<string, true>({ max: ABSENT_ENTRIES, ttl: ABSENT_TTL_MS })
  /**
   * When (on #clock) each recently written session was last written: a load that began before a write ended
   * must not record the session as absent, whatever order their replies came in.
   */
  readonly #lastWrite = new LRUCache<string, number>({ max: ABSENT_ENTRIES })
  /** Relocations and restores counted recently, so that one move is counted once. */
  readonly #recentMoves = new LRUCache<string, true>({ max: ABSENT_ENTRIES, ttl: ABSENT_TTL_MS })
  /** Per session (random part of its id), the node this instance last moved it to, once written there. */
  readonly #movedTo = new LRUCache<string, { readonly nodeId: string; readonly at: number }>({
    max: MOVES_REMEMBERED,
    ttl: MOVES_TTL_MS,
  })
  /**
   * Moves a load chose and its request has not written yet (it may never: aborted, failed). Kept as long as the
   * moves they lead to (#movedTo): a request may run long between its read and its write (an upload, a slow
   * handler), and a move forgotten meanwhile is neither followed nor cleaned off its old node.
   */
  readonly #moving = new LRUCache<string, ChosenMove>({ max: MOVES_REMEMBERED, ttl: MOVES_TTL_MS })
  /** Corrupt copies reported lately: one read again before its deletion lands is not reported twice. */
  readonly #recentCorrupt = new LRUCache<string, true>({ max: ABSENT_ENTRIES, ttl: ABSENT_TTL_MS })
  #clock = 0
  /** The destroys' repeated deletes still waiting, with their keys. */
  readonly #repeats = new Map<NodeJS.Timeout, StorageKeys>()
  /** The bytes of the longest key a session's record is stored under (its backup's). */
  readonly #longestKeyBytes: number

  constructor(ring: NodeRing, options: StoreOptions) {
    this.#ring = ring
    this.#options = options
    this.#longestKeyBytes = Buffer.byteLength(storageKeys(options.prefix, '').backup)
  }

  /**
   * A new id on the next alive node (round-robin), carrying `route` in sticky mode. With every node down it still
   * returns an id; saving it relocates it or fails.
   */
  newSessionId(route?: string): string {
    const nodeId = this.#ring.nodeForNewSession() ?? this.#ring.firstNodeId()
    return formatSessionId(newRandomPart(), nodeId, route)
  }

  /**
   * Parses an id. Its node may be one this instance does not know (removed by setNodes(), here or before this
   * instance started): such a session is looked for on the configured nodes, from its backup, and moved like
   * one whose node died. The library never connects anywhere but to configured nodes.
   */
  recognize(id: string): ParsedSessionId | null {
    return parseSessionId(id)
  }

  /**
   * The node a session is looked for first: where this instance moved it (#moveOf), else the one its id names.
   * Locks are taken there, so requests presenting the old id and the new one wait for each other.
   */
  presumedNode(parsed: ParsedSessionId): string {
    return this.#moveOf(parsed) ?? parsed.nodeId
  }

  /**
   * Where this instance moved the session. Where that node is dead now, the session fails over from it as for
   * the new id. A move is forgotten once its node failed and came back: another instance may have moved the
   * session on meanwhile, and the id is then looked up as it was presented.
   */
  #moveOf(parsed: ParsedSessionId): string | undefined {
    const moved = this.#movedTo.get(parsed.random)
    if (moved === undefined || moved.nodeId === parsed.nodeId) return undefined
    if (!this.#ring.isAlive(moved.nodeId) || this.#ring.aliveSince(moved.nodeId, moved.at))
      return moved.nodeId
    this.#movedTo.delete(parsed.random)
    return undefined
  }

  /** Whether the id is remembered as found nowhere, without counting a hit. */
  remembersAbsent(random: string): boolean {
    return this.#absent.has(random)
  }

  /** Whether the session was recently found on no node, or destroyed, by this instance. */
  knownAbsent(parsed: ParsedSessionId): boolean {
    if (!this.#absent.has(parsed.random)) return false
    this.#options.metrics.counters.knownAbsentHits++
    return true
  }

  /**
   * Reads a session from its primary, or else from the freshest backup. Null means the session does not exist
   * (expired, destroyed, or never issued). Throws AllNodesDownError when no node could answer at all.
   */
  async load(id: string): Promise<LoadedSession | null> {
    const parsed = this.recognize(id)
    if (!parsed || this.knownAbsent(parsed)) return null
    const primary = parsed.nodeId
    const movedTo = this.#moveOf(parsed)
    if (movedTo !== undefined) {
      // As if the client had presented its new id (it is sent again), even where the old node is alive again
      // with the copy from before the move. Not found that way, the session is not found at all: the move was
      // written, so the copy from before it must not come back.
      const followed = await this.load(formatSessionId(parsed.random, movedTo, parsed.route))
      return followed && { ...followed, followedMove: true }
    }
    const keys = storageKeys(this.#options.prefix, parsed.random)
    const started = ++this.#clock
    const seen = { foreign: false }

    let primaryAnswered = false
    if (this.#ring.isAlive(primary)) {
      try {
        const read = await this.#ring.call(primary, (node) => node.gets(keys.primary))
        primaryAnswered = true
        const record = read && this.#decode(read.value, primary, keys, keys.primary, seen)
        if (record && read) {
          return {
            id,
            record,
            // Written under a retired key (or the other encryption setting): rewritten now, under the current.
            mustWrite: record.rewrap === true,
            relocatedFrom: undefined,
            cas: { nodeId: primary, token: read.cas },
          }
        }
      } catch (error) {
        if (error instanceof NodeRejectedError) primaryAnswered = true
      }
    }

    // A primary removed from the node list has nothing more to say: every configured node is a backup.
    const configured = this.#ring.isConfigured(primary)
    const backup = await this.#freshestBackup(primary, keys)
    if (!backup.record) {
      if (!primaryAnswered && backup.answered === 0) throw this.allNodesDown()
      // Absent only when every node answered and held nothing, not even a copy another instance could read
      // (one that did not answer may return holding the session), and no write of it ended meanwhile.
      if (
        (primaryAnswered || !configured) &&
        backup.answered === this.#ring.size - (configured ? 1 : 0) &&
        !seen.foreign &&
        !backup.foreign &&
        (this.#lastWrite.get(parsed.random) ?? 0) < started
      ) {
        this.#absent.set(parsed.random, true)
      }
      if (!primaryAnswered && configured) {
        this.#options.logger.warn(
          { node: primary },
          'session-failover: primary is down and no backup was found',
        )
      }
      return null
    }
    if (primaryAnswered) {
      // The primary is up but lost its copy (restarted empty): same id, the copy is written back this request.
      if (this.#firstMove(keys.digest, 'restore')) this.#options.metrics.counters.restores++
      return { id, record: backup.record, mustWrite: true, relocatedFrom: undefined }
    }
    const target = this.#ring.nextAliveAfter(primary)
    if (!target) throw this.allNodesDown()
    this.#relocated(keys, primary, target)
    // The copy read is, byte for byte, what the old node held too (both copies are written from one blob).
    const copyBefore = sameBlob(backup.blob as Buffer)
    this.#moving.set(parsed.random, { from: primary, to: target, copyBefore })
    return {
      id: formatSessionId(parsed.random, target, parsed.route),
      record: backup.record,
      mustWrite: true,
      relocatedFrom: primary,
    }
  }

  /**
   * Writes the primary and the backup copy in parallel and returns the id the session now has. When the primary
   * is dead (or dies during the write) the session is relocated to the next alive node and the returned id
   * names it: the caller must reissue the cookie.
   */
  async save(
    id: string,
    record: SessionRecord,
    ttlSeconds: number,
    {
      onlyIfNewer = false,
      ifUnchanged,
      backupIfOlder = false,
    }: {
      onlyIfNewer?: boolean
      ifUnchanged?: { readonly nodeId: string; readonly token: CasToken }
      /** With `ifUnchanged` and no lock: the backup is not overwritten by an older version (see merge()). */
      backupIfOlder?: boolean
    } = {},
  ): Promise<string> {
    const parsed = parseSessionId(id)
    if (!parsed) throw new TypeError('save() needs an id issued by this store')
    const keys = storageKeys(this.#options.prefix, parsed.random)
    const blob = this.#encodeWithinLimit(record, keys)
    if (ifUnchanged) {
      return this.#saveIfUnchanged(parsed, keys, record, blob, ttlSeconds, ifUnchanged, backupIfOlder)
    }
    this.#wrote(parsed.random)
    if (onlyIfNewer) {
      // A write that waited (async, or through an outage) must not replace what another instance stored since,
      // nor bring back a session logged out meanwhile: the copies are gone then, and only the mark a sticky
      // logout leaves on every node says why. Read-then-write is not atomic; it narrows the window from the wait
      // to one round trip.
      const [stored, loggedOut] = await Promise.all([
        this.#storedRecord(parsed.nodeId, keys),
        this.#markedGone(parsed.nodeId, keys),
      ])
      if (loggedOut) {
        throw new StaleWriteError('the session was logged out meanwhile', { loggedOut: true })
      }
      if (stored && !isNewer(record, stored)) {
        throw new StaleWriteError('a newer copy of this session was stored meanwhile')
      }
    }

    let primary = parsed.nodeId
    // Nodes whose write failed: the write may land later. Once the session is stored elsewhere, such a copy
    // is deleted before its node counts as back; if it is stored nowhere, that copy may be the only one.
    const failedOn: string[] = []
    // As many attempts as the ring has nodes when the write begins: a setNodes() that removes the node being
    // written meanwhile must not take away the attempt on the node that is left.
    for (let attempt = 0, attempts = this.#ring.size; attempt < attempts; attempt++) {
      if (!this.#ring.isAlive(primary)) {
        const next = this.#ring.nextAliveAfter(primary)
        if (!next) break
        primary = next
      }
      const [primaryWrite] = await Promise.allSettled([
        this.#ring.call(primary, (node) => node.set(keys.primary, blob, ttlSeconds)),
        this.#writeBackup(primary, keys, blob, ttlSeconds),
      ])
      const counters = this.#options.metrics.counters
      if (primaryWrite.status === 'rejected') {
        counters.primaryWriteFailures++
        if (!(primaryWrite.reason instanceof NodeRejectedError)) failedOn.push(primary)
      }
      if (primaryWrite.status === 'fulfilled') {
        counters.primaryWrites++
        if (failedOn.length > 0) {
          this.#supersede(
            failedOn.map((nodeId) => ({ nodeId, key: keys.primary, value: blob })),
            primary,
          )
        }
        this.#wrote(parsed.random)
        this.#landed(parsed, keys, primary)
        const now = Date.now()
        this.#lastRefresh.set(parsed.random, now)
        this.#lastBackupCheck.set(parsed.random, now)
        return formatSessionId(parsed.random, primary, parsed.route)
      }
      if (primaryWrite.reason instanceof NodeRejectedError) throw primaryWrite.reason
    }
    throw this.allNodesDown()
  }

  /**
   * Keeps an unchanged session alive and its copies in place, without rewriting it:
   * - once `touchAfter` of its TTL has passed since the last write or refresh (per instance), both copies are
   *   touched to a full TTL;
   * - otherwise, at most once per `backupCheckIntervalMs`, the backup alone is touched to the expiry it already
   *   has: a check that it still exists. Without it, restarting the backup node and then the primary (a rolling
   *   restart) would lose every session that was only read in between.
   * `verifyPrimary` checks the primary the same way (sticky mode, where the primary is never read). A missing
   * copy is written again from the other copy (see #restore). Never throws: a failed touch only costs node
   * health.
   */
  async refresh(id: string, record: SessionRecord, ttlSeconds: number): Promise<void> {
    await this.#refresh(id, record, ttlSeconds, false)
  }

  /**
   * refresh() for sticky mode, whose owner holds the session in memory: 'gone' when that copy was not written
   * back because the session was logged out on another instance (which took it over from this one).
   */
  verifyHeld(id: string, record: SessionRecord, ttlSeconds: number): Promise<'gone' | undefined> {
    return this.#refresh(id, record, ttlSeconds, true)
  }

  async #refresh(
    id: string,
    record: SessionRecord,
    ttlSeconds: number,
    verifyPrimary: boolean,
  ): Promise<'gone' | undefined> {
    const parsed = parseSessionId(id)
    if (!parsed) return
    const now = Date.now()
    const lastRefresh = Math.max(record.writtenAt, this.#lastRefresh.get(parsed.random) ?? 0)
    const touchDue = now - lastRefresh >= this.#options.touchAfter * ttlSeconds * 1000
    const lastCheck = Math.max(lastRefresh, this.#lastBackupCheck.get(parsed.random) ?? 0)
    if (!touchDue && now - lastCheck < this.#options.backupCheckIntervalMs) return
    this.#lastBackupCheck.set(parsed.random, now)
    if (touchDue) this.#lastRefresh.set(parsed.random, now)
    const backupTtl = touchDue ? ttlSeconds : Math.ceil((lastRefresh + ttlSeconds * 1000 - now) / 1000)
    if (!(backupTtl > 0)) return

    const keys = storageKeys(this.#options.prefix, parsed.random)
    const primary = parsed.nodeId
    const backup = this.#ring.nextAliveAfter(primary)
    const primaryAlive = this.#ring.isAlive(primary)
    // Sticky mode (verifyPrimary) holds the session in this instance's memory, where its owner serves it from:
    // found on neither node (both restarted), it is written again from there.
    const fallback = verifyPrimary ? record : undefined
    const keep = async (nodeId: string, key: string, ttl: number, from: CopyAt | undefined) => {
      if (await this.#ring.call(nodeId, (node) => node.touch(key, ttl))) return undefined
      return this.#restore(keys, { nodeId, key }, ttl, from, fallback)
    }
    const kept = await Promise.allSettled([
      primaryAlive &&
        (touchDue || verifyPrimary) &&
        keep(
          primary,
          keys.primary,
          touchDue ? ttlSeconds : backupTtl,
          backup ? { nodeId: backup, key: keys.backup } : undefined,
        ),
      backup &&
        keep(
          backup,
          keys.backup,
          backupTtl,
          primaryAlive ? { nodeId: primary, key: keys.primary } : undefined,
        ),
    ])
    return kept.some((outcome) => outcome.status === 'fulfilled' && outcome.value === 'gone')
      ? 'gone'
      : undefined
  }

  /**
   * A copy that a touch found missing (its node restarted empty) is written again from the other copy, read now.
   * Not from the copy this request read when it began: a logout on another instance since then deleted both
   * copies, and writing one back would undo it. Gone from both, the session stays gone, unless `fallback` (sticky
   * mode: the owner's copy in memory) is given and no logout marked it gone (a logout on the instance that took
   * it over from this one). With `add`, not `set`:
   * a newer version written meanwhile is never overwritten. Re-encoded, so a copy too large for the limit in force
   * now (lowered, or encryption turned on) is not written back. A logout whose two deletes land on either side of
   * this read and add can still leave one copy: a window of one round trip, not the whole request's life.
   */
  async #restore(
    keys: StorageKeys,
    missing: CopyAt,
    ttl: number,
    from: CopyAt | undefined,
    fallback: SessionRecord | undefined,
  ): Promise<'gone' | undefined> {
    const blob = from && (await this.#ring.call(from.nodeId, (node) => node.get(from.key)))
    let record = blob && this.#decode(blob, from.nodeId, keys, from.key)
    if (!record && fallback) {
      // Logged out on another instance, which took the session over from this one: not written back.
      if (await this.#ring.call(missing.nodeId, (node) => node.get(keys.gone))) return 'gone'
      record = fallback
    }
    if (!record || this.#options.codec.encodedLength(record) > this.#options.maxSessionBytes) return undefined
    await this.#ring.call(missing.nodeId, (node) =>
      node.add(missing.key, this.#options.codec.encode(record, keys.digest), ttl),
    )
    return undefined
  }

  async close(): Promise<void> {}

  /**
   * A write that must not replace a copy stored since this request read it: compare-and-set on the primary,
   * then the backup (after, so a copy the primary refused never reaches the backup). StaleWriteError when the
   * primary changed, was removed or moved: the caller merges instead. `backupIfOlder`: no lock keeps the next
   * writer of the session waiting for this backup, so it is written only over an older copy, as merge() does.
   */
  async #saveIfUnchanged(
    parsed: ParsedSessionId,
    keys: StorageKeys,
    record: SessionRecord,
    blob: Buffer,
    ttlSeconds: number,
    read: { readonly nodeId: string; readonly token: CasToken },
    backupIfOlder: boolean,
  ): Promise<string> {
    if (read.nodeId !== parsed.nodeId || !this.#ring.isAlive(read.nodeId)) {
      throw new StaleWriteError('the session moved since it was read')
    }
    const counters = this.#options.metrics.counters
    const outcome = await this.#ring
      .call(read.nodeId, (node) => node.setIfUnchanged(keys.primary, blob, ttlSeconds, read.token))
      .catch((error: unknown) => {
        counters.primaryWriteFailures++
        // The primary died under the write (the ring marks it dead): the caller merges this request's change
        // onto the freshest copy, where the session moves to, as for any write that finds the node gone. If the
        // write lands after all (a frozen node resumes), that copy is deleted before the node counts as back.
        if (error instanceof NodeOperationError || error instanceof OperationTimeoutError) {
          throw new StaleWriteError('the primary failed during the write', {
            cause: error,
            lateWrite: { nodeId: read.nodeId, key: keys.primary, value: blob },
          })
        }
        throw error
      })
    if (outcome !== 'stored') throw new StaleWriteError('the session changed since it was read')
    counters.primaryWrites++
    this.#wrote(parsed.random)
    this.#landed(parsed, keys, read.nodeId)
    if (backupIfOlder) await this.#writeBackupIfOlder(read.nodeId, keys, record, blob, ttlSeconds)
    else await this.#writeBackup(read.nodeId, keys, blob, ttlSeconds)
    const now = Date.now()
    this.#lastRefresh.set(parsed.random, now)
    this.#lastBackupCheck.set(parsed.random, now)
    return formatSessionId(parsed.random, read.nodeId, parsed.route)
  }

  /**
   * Writes this request's changes onto the stored session instead of overwriting it (lockingMode 'merge', and
   * any write made without the lock): read the primary with its CAS token, apply the changed keys, write only
   * if nothing was stored in between (else read and apply again), then write the backup unless a newer copy is
   * already there. Atomic on the primary; the backup follows it.
   */
  async merge(
    id: string,
    changes: SessionChanges,
    cookieJson: string,
    ttlSeconds: number,
    /** A write of this session that failed on its node (which may run it later): deleted once this one lands. */
    lateWrite?: LateWrite,
  ): Promise<{ id: string; record: SessionRecord; conflicts: number } | null> {
    const parsed = parseSessionId(id)
    if (!parsed) throw new TypeError('merge() needs an id issued by this store')
    const keys = storageKeys(this.#options.prefix, parsed.random)
    const lateWrites: LateWrite[] = lateWrite ? [lateWrite] : []
    for (let attempt = 0; attempt < MAX_MERGE_ATTEMPTS; attempt++) {
      /** This attempt's write, once sent: if its node fails, it may still land there. */
      let sent: Buffer | undefined
      const primary = this.#ring.isAlive(parsed.nodeId)
        ? parsed.nodeId
        : this.#ring.nextAliveAfter(parsed.nodeId)
      if (!primary) break
      try {
        const current = await this.#ring.call(primary, (node) => node.gets(keys.primary))
        // No primary copy where the session is (it moved here, or the node restarted): the freshest copy of
        // either key on any alive node, the backup key on this very node included.
        const fromPrimary = current && this.#decode(current.value, primary, keys, keys.primary)
        const freshest = fromPrimary ? undefined : await this.#freshestCopy(keys)
        const base = fromPrimary || freshest?.record
        if (!base) {
          // No copy on any node, and every node answered: the session was destroyed (or expired) meanwhile; a
          // part of it must not come back. A node that did not answer (one that just failed) may hold it.
          if (freshest && freshest.answered === this.#ring.size && !freshest.foreign) return null
          throw new AllNodesDownError(
            'The session is on no node that answers (its node just failed); the change was not stored',
            this.#options.retryAfterSeconds,
          )
        }
        const { data, conflicts } = this.#applyChanges(base, changes)
        const record: SessionRecord = {
          version: base.version + 1,
          writtenAt: Date.now(),
          createdAt: base.createdAt,
          cookieJson,
          data,
          format: this.#options.serializer.tag,
        }
        const blob = this.#encodeWithinLimit(record, keys)
        sent = blob
        const stored = current
          ? (await this.#ring.call(primary, (node) =>
              node.setIfUnchanged(keys.primary, blob, ttlSeconds, current.cas),
            )) === 'stored'
          : await this.#ring.call(primary, (node) => node.add(keys.primary, blob, ttlSeconds))
        if (!stored) continue
        this.#options.metrics.counters.primaryWrites++
        this.#supersede(lateWrites, primary)
        this.#wrote(parsed.random)
        this.#landed(parsed, keys, primary)
        await this.#writeBackupIfOlder(primary, keys, record, blob, ttlSeconds)
        this.#lastRefresh.set(parsed.random, record.writtenAt)
        this.#lastBackupCheck.set(parsed.random, record.writtenAt)
        return { id: formatSessionId(parsed.random, primary, parsed.route), record, conflicts }
      } catch (error) {
        if (
          error instanceof NodeRejectedError ||
          error instanceof SessionTooLargeError ||
          error instanceof UnserializableSessionError ||
          error instanceof CorruptSessionError ||
          error instanceof AllNodesDownError
        ) {
          throw error
        }
        this.#options.metrics.counters.primaryWriteFailures++
        // The node is marked dead; the next attempt merges where the session moves to. The write this attempt
        // sent, if it got that far, may still land there.
        if (sent) lateWrites.push({ nodeId: primary, key: keys.primary, value: sent })
      }
    }
    if (!this.#ring.anyAlive()) throw this.allNodesDown()
    throw new ConcurrentUpdateError(
      `The session kept changing under this request's write (${MAX_MERGE_ATTEMPTS} attempts); nothing was written`,
    )
  }

  /** Every instance reads the nodes, so a destroy from any of them ends the session everywhere. */
  destroysEverywhere(): boolean {
    return true
  }

  /**
   * Removes every copy: both keys on every node, not only on the current primary and backup (a node that held
   * the session before a relocation must not bring a destroyed session back), and on a node that is down, as
   * soon as it is back. `markGoneForSeconds` (sticky mode) first leaves the logout's mark on every node alive.
   */
  async destroy(id: string, { markGoneForSeconds }: { markGoneForSeconds?: number } = {}): Promise<void> {
    const parsed = parseSessionId(id)
    if (!parsed) return
    const keys = storageKeys(this.#options.prefix, parsed.random)
    // Sticky mode: marked gone on every node before the copies go, so a check that finds them gone finds the mark.
    if (markGoneForSeconds !== undefined) {
      await this.#ring.writeEverywhere(keys.gone, GONE_MARK, markGoneForSeconds)
    }
    this.#lastRefresh.delete(parsed.random)
    this.#lastBackupCheck.delete(parsed.random)
    this.#movedTo.delete(parsed.random)
    this.#moving.delete(parsed.random)
    this.#absent.set(parsed.random, true)
    if (!(await this.#ring.deleteEverywhere([keys.primary, keys.backup]))) throw this.allNodesDown()
    this.#deleteAgainLater(keys)
  }

  /**
   * A write of the session already under way when it was destroyed (a request on another instance, whose lock
   * a destroySession() does not take; an unlocked merge) writes its backup after its primary, and that backup
   * may land after the deletes, where a failover would find it: the session would come back. No write under these
   * keys is legitimate any more (a destroyed id is never stored again: a request presenting it starts a new
   * session), so they are deleted once more when such a write has landed; at close() already (see repeatNow).
   */
  #deleteAgainLater(keys: StorageKeys): void {
    const timer = setTimeout(() => {
      this.#repeats.delete(timer)
      this.#ring.deleteEverywhere([keys.primary, keys.backup]).catch(ignore)
    }, this.#options.repeatDeleteAfterMs)
    timer.unref()
    this.#repeats.set(timer, keys)
  }

  /**
   * close(): the repeated deletes still waiting run now. No other instance knows of them, so an instance that
   * closed without them would leave them undone. Waiting until they are due would hold every close() that
   * follows a logout for a second or more, an app's test suite's included; a write that lands later stays.
   * What a node that is down is owed by them is left to NodeRing.settleOwed().
   */
  async repeatNow(): Promise<void> {
    const waiting = [...this.#repeats]
    this.#repeats.clear()
    await Promise.all(
      waiting.map(([timer, keys]) => {
        clearTimeout(timer)
        return this.#ring.deleteEverywhere([keys.primary, keys.backup]).catch(ignore)
      }),
    )
  }

  /** Writes the backup copy unless the backup node already holds this version or a newer one. */
  async #writeBackupIfOlder(
    primary: string,
    keys: StorageKeys,
    record: SessionRecord,
    blob: Buffer,
    ttlSeconds: number,
  ): Promise<void> {
    const key = keys.backup
    const counters = this.#options.metrics.counters
    for (let attempt = 0; attempt < MAX_MERGE_ATTEMPTS; attempt++) {
      const backup = this.#ring.nextAliveAfter(primary)
      if (!backup) break
      try {
        const done = await this.#ring.call(backup, async (node) => {
          const current = await node.gets(key)
          if (!current) return node.add(key, blob, ttlSeconds)
          const existing = this.#decode(current.value, backup, keys, key)
          if (existing && !isNewer(record, existing)) return true
          return (await node.setIfUnchanged(key, blob, ttlSeconds, current.cas)) === 'stored'
        })
        if (done) {
          counters.backupWrites++
          return
        }
      } catch (error) {
        counters.backupWriteFailures++
        if (error instanceof NodeRejectedError) throw error
      }
    }
    this.#backupFailed(keys, primary)
  }

  async #writeBackup(
    primary: string,
    keys: StorageKeys,
    blob: Buffer,
    ttlSeconds: number,
  ): Promise<string | undefined> {
    const counters = this.#options.metrics.counters
    // Each failure marks that node dead, so the next pass picks the following node; bounded by the ring's size
    // when the write begins (as in save()).
    for (let attempt = 0, attempts = this.#ring.size; attempt < attempts; attempt++) {
      const backup = this.#ring.nextAliveAfter(primary)
      if (!backup) break
      try {
        await this.#ring.call(backup, (node) => node.set(keys.backup, blob, ttlSeconds))
        counters.backupWrites++
        return backup
      } catch (error) {
        counters.backupWriteFailures++
        if (error instanceof NodeRejectedError) throw error
      }
    }
    this.#backupFailed(keys, primary)
    return undefined
  }

  #backupFailed(keys: StorageKeys, primary: string): void {
    const session = keys.digest.slice(0, 12)
    this.#options.logger.warn(
      { node: primary, session },
      'session-failover: no alive node took the backup copy',
    )
    this.#options.metrics.emit('backupFailed', { session, primary })
  }

  /**
   * The session is stored on `storedOn`: writes of it that failed on other nodes, and may land there later (a
   * frozen node runs them when it resumes), are deleted before those nodes count as back, so a client with an
   * older cookie never reads them.
   */
  #supersede(lateWrites: readonly LateWrite[], storedOn: string): void {
    for (const late of lateWrites) {
      if (late.nodeId !== storedOn) this.#ring.deleteWhenBack(late.nodeId, late.key, late.value)
    }
  }

  /**
   * A write of the session (under `parsed`) landed on `nodeId`. A move that a load chose, or this write made,
   * is remembered only now: followed before it was written, a move would find nothing (#moveOf).
   */
  #landed(parsed: ParsedSessionId, keys: StorageKeys, nodeId: string): void {
    const moved = nodeId !== parsed.nodeId
    const chosen = this.#moving.get(parsed.random)
    if (moved) this.#relocated(keys, parsed.nodeId, nodeId)
    else if (chosen?.to !== nodeId) return
    this.#moving.delete(parsed.random)
    this.#movedTo.set(parsed.random, { nodeId, at: Date.now() })
    // The old node, once back, would hand its copy from before the move to an instance that does not know of the
    // move. It goes as soon as this instance finds the node back, if it is still exactly that copy.
    if (chosen?.to === nodeId) this.#ring.deleteOldCopyWhenBack(chosen.from, keys.primary, chosen.copyBefore)
  }

  /** Counted once per session and move: parallel requests of a session that fail over together are one move. */
  #relocated(keys: StorageKeys, from: string, to: string): void {
    if (!this.#firstMove(keys.digest, `${from}>${to}`)) return
    this.#options.metrics.counters.relocations++
    this.#options.metrics.emit('relocated', { session: keys.digest.slice(0, 12), from, to })
  }

  #firstMove(session: string, move: string): boolean {
    const key = `${session}:${move}`
    if (this.#recentMoves.has(key)) return false
    this.#recentMoves.set(key, true)
    return true
  }

  /** The freshest copy of either key on every alive node. */
  #freshestCopy(keys: StorageKeys): Promise<FreshestCopy> {
    return this.#freshestOn(this.#ring.aliveIds(), keys)
  }

  async #freshestBackup(primary: string, keys: StorageKeys): Promise<FreshestCopy> {
    // Read both keys on every other alive node: after earlier failures the backup may sit on a node further
    // along; a relocation whose new cookie never reached the client left the primary copy on another node;
    // and a node that came back may hold an older copy. The highest version wins. This runs only when the
    // primary is down or has no copy (failover, restart, or a session that expired or was destroyed).
    return this.#freshestOn(this.#ring.aliveOthers(primary), keys)
  }

  async #freshestOn(candidates: readonly string[], keys: StorageKeys): Promise<FreshestCopy> {
    const seen = { foreign: false }
    const reads = await Promise.allSettled(
      candidates.map((nodeId) =>
        this.#ring.call(nodeId, async (node) => {
          const copyOf = (blob: Buffer | null, key: string) => {
            const record = blob && this.#decode(blob, nodeId, keys, key, seen)
            return record ? { record, blob: blob as Buffer } : undefined
          }
          const [backup, primary] = await Promise.all([node.get(keys.backup), node.get(keys.primary)])
          return [copyOf(backup, keys.backup), copyOf(primary, keys.primary)]
        }),
      ),
    )
    let record: SessionRecord | undefined
    let blob: Buffer | undefined
    let answered = 0
    for (const read of reads) {
      if (read.status !== 'fulfilled') continue
      answered++
      for (const copy of read.value) {
        if (copy && (!record || isNewer(copy.record, record))) ({ record, blob } = copy)
      }
    }
    return { record, answered, foreign: seen.foreign, blob }
  }

  /** Whether a sticky logout's mark is on the primary (or, that down, the next node alive): it is on every node. */
  async #markedGone(primary: string, keys: StorageKeys): Promise<boolean> {
    const nodeId = this.#ring.isAlive(primary) ? primary : this.#ring.nextAliveAfter(primary)
    if (!nodeId) return false
    try {
      return (await this.#ring.call(nodeId, (node) => node.get(keys.gone))) !== null
    } catch {
      return false
    }
  }

  /** The stored copy (primary, else freshest backup) without failover side effects; undefined when none. */
  async #storedRecord(primary: string, keys: StorageKeys): Promise<SessionRecord | undefined> {
    if (this.#ring.isAlive(primary)) {
      try {
        const blob = await this.#ring.call(primary, (node) => node.get(keys.primary))
        const record = blob && this.#decode(blob, primary, keys, keys.primary)
        if (record) return record
      } catch {
        // fall back to the backups
      }
    }
    return (await this.#freshestBackup(primary, keys)).record
  }

  /**
   * A copy that fails its check (forged, damaged, or unreadable) counts as no copy, and is deleted so it costs
   * nothing again: only if it is still the same bytes, so a copy written meanwhile stays. A copy another
   * instance may read (another key) is only skipped, and noted in `seen`.
   */
  #decode(
    blob: Buffer,
    nodeId: string,
    keys: StorageKeys,
    key: string,
    seen?: { foreign: boolean },
  ): SessionRecord | undefined {
    try {
      return this.#options.codec.decode(blob, keys.digest)
    } catch (error) {
      if (!(error instanceof CorruptSessionError)) throw error
      const session = keys.digest.slice(0, 12)
      if (error instanceof ForeignRecordError) {
        // Expected while instances roll onto a new key or serializer: counted apart, never an alarm.
        this.#options.metrics.counters.foreignRecords++
        this.#options.logger.debug(
          { node: nodeId, session, err: error.message },
          'session-failover: copy skipped',
        )
        if (seen) seen.foreign = true
        return undefined
      }
      const copy = `${nodeId}:${key}:${hash('sha256', blob, 'base64url')}`
      if (this.#recentCorrupt.has(copy)) return undefined
      this.#recentCorrupt.set(copy, true)
      this.#options.metrics.counters.corruptSessions++
      this.#options.metrics.emit('corruptSession', { session, node: nodeId, reason: error.message })
      this.#options.logger.warn(
        { node: nodeId, session, err: error.message },
        'session-failover: unreadable stored session ignored',
      )
      void this.#ring
        .call(nodeId, async (node) => {
          const current = await node.gets(key)
          if (current?.value.equals(blob)) await node.deleteIfUnchanged(key, current.cas)
        })
        .catch(() => {})
      return undefined
    }
  }

  /** A merge onto a copy in a format this instance cannot read fails like a contended one (503), never a 500. */
  #applyChanges(base: SessionRecord, changes: SessionChanges): { data: Buffer; conflicts: number } {
    try {
      return applyChanges(this.#options.serializer, base, changes)
    } catch (error) {
      if (!(error instanceof ForeignRecordError)) throw error
      throw new ConcurrentUpdateError(
        'The stored session was written in a data format this instance cannot read; nothing was written',
        { cause: error },
      )
    }
  }

  /** A write of the session ended (or is about to be made): it is no longer known absent. */
  #wrote(random: string): void {
    this.#absent.delete(random)
    this.#lastWrite.set(random, ++this.#clock)
  }

  /**
   * Throws SessionTooLargeError when `record` would be stored in more than `maxSessionBytes`: checked before
   * anything is written (memcached deletes the stored item when a write of it is too large), and by sticky mode
   * before it accepts a session it backs up later.
   */
  assertFits(record: SessionRecord): void {
    const length = this.#options.codec.encodedLength(record)
    const limit = this.#options.maxSessionBytes
    if (length > limit) {
      throw new SessionTooLargeError(
        `The session is ${length} bytes stored, more than maxSessionBytes (${limit}). ` +
          'It was not written; the stored copy is unchanged.',
      )
    }
    // A node's own limit below maxSessionBytes (memcached started with a smaller -I). The node would refuse the
    // write unsent in any case; this refuses it before either copy is written, with the error for it.
    const largest = this.#ring.largestValue(this.#longestKeyBytes)
    if (length > largest) {
      throw new SessionTooLargeError(
        `The session is ${length} bytes stored, more than a node stores (${largest} bytes under its key: ` +
          'memcached -I). It was not written; the stored copy is unchanged. Lower maxSessionBytes to match, ' +
          "or raise the node's -I.",
      )
    }
  }

  #encodeWithinLimit(record: SessionRecord, keys: StorageKeys): Buffer {
    this.assertFits(record)
    return this.#options.codec.encode(record, keys.digest)
  }

  /** The error of a session that can be neither read nor stored: no node is alive. */
  allNodesDown(): AllNodesDownError {
    return new AllNodesDownError(
      'No session node is reachable; the session can be neither read nor stored safely',
      this.#options.retryAfterSeconds,
    )
  }
}
