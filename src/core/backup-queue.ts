import { AllNodesDownError, StaleWriteError } from '../errors.js'
import type { Logger } from '../logger.js'
import type { SessionRecord } from './codec.js'

export interface BackupJob {
  readonly id: string
  /** The copy to store; null deletes the session (a destroy made while no node was alive). */
  readonly record: SessionRecord | null
  /** Epoch ms the stored copies expire at: a write that waited (an outage) stores them for what is left. */
  readonly expiresAt: number
  /** Write only if the stored copy is not newer: set for writes that waited (async, or after an outage). */
  readonly onlyIfNewer: boolean
}

/**
 * written: stored (under `id`, which changes on relocation); not written: no node alive, the job stays queued;
 * withdrawn: the session was destroyed (or taken over) meanwhile, and this write must not be kept in memory.
 */
export type JobOutcome =
  | { readonly written: true; readonly id: string }
  | { readonly written: false; readonly withdrawn?: true }

const WITHDRAWN: JobOutcome = { written: false, withdrawn: true }

/**
 * What a session's record is charged in memory, in the local cache and in this queue alike: its data, its cookie
 * text (UTF-16), and the entry around them.
 */
export function recordBytes(record: SessionRecord | null): number {
  return 200 + (record ? record.data.length + 2 * record.cookieJson.length : 0)
}

export interface BackupQueueOptions {
  /** Most sessions waiting; past it offer() refuses. */
  readonly maxPending: number
  /** Most bytes of records waiting (as `recordBytes` counts them); past it offer() refuses. */
  readonly maxPendingBytes: number
  /** Background (offered) writes running at once; submitted writes are not limited by it. */
  readonly concurrency: number
  /** Wait before retrying while no node is alive. */
  readonly retryDelayMs: number
  /** Performs one job; resolves with the session's id afterwards (it changes on relocation). */
  readonly run: (job: BackupJob) => Promise<string>
  readonly onWritten: (key: string, job: BackupJob, id: string) => void
  /** The stored copy was newer than the job's (another instance owns the session now), or the session was logged out meanwhile. */
  readonly onStale: (key: string, job: BackupJob, error: StaleWriteError) => void
  /** No node alive, and the queue full: the job is not kept (the session has no stored copy of this version). */
  readonly onDropped: (key: string, job: BackupJob) => void
  readonly logger: Logger
}

interface Waiter {
  resolve(outcome: JobOutcome): void
  reject(error: unknown): void
}

interface Entry {
  job: BackupJob
  waiters: Waiter[]
  /** Submitted by a request that waits for it: started at once, not behind background writes. */
  urgent: boolean
}

interface Running {
  readonly entry: Entry
  done: Promise<void>
  /** withdraw() was called: a failure must not put the job back. */
  withdrawn: boolean
}

/**
 * Every sticky write of a session passes through here, so one session is never written by two jobs at once and
 * the newest copy is the one that lands. One pending job per session: a newer write replaces the queued one
 * (coalescing), and whoever waited for the older one learns the outcome of the newer. While no node is alive,
 * jobs stay queued and are retried; nothing is dropped silently.
 */
export class BackupQueue {
  readonly #options: BackupQueueOptions
  readonly #pending = new Map<string, Entry>()
  /** recordBytes of every pending job's record: through an outage the count alone would let 10 000 large sessions wait. */
  #pendingBytes = 0
  readonly #running = new Map<string, Running>()
  #backgroundRunning = 0
  #retryTimer: NodeJS.Timeout | undefined
  #idle: Array<() => void> = []

  constructor(options: BackupQueueOptions) {
    this.#options = options
  }

  /** Sessions waiting or being written. */
  get size(): number {
    return this.#pending.size + this.#running.size
  }

  has(key: string): boolean {
    return this.#pending.has(key) || this.#running.has(key)
  }

  /** The newest job of a session not yet stored: what this instance acknowledged last. */
  latest(key: string): BackupJob | undefined {
    return (this.#pending.get(key) ?? this.#running.get(key)?.entry)?.job
  }

  /** Queues (or replaces) a background write; false when the queue is full. */
  offer(key: string, job: BackupJob): boolean {
    const entry = this.#pending.get(key)
    if (entry) this.#replace(entry, job)
    else if (!this.#fits(job)) return false
    else this.#add(key, { job, waiters: [], urgent: false })
    this.#pump()
    return true
  }

  /** Queues a write and waits for it (or for a newer write of the same session that replaced it). */
  submit(key: string, job: BackupJob): Promise<JobOutcome> {
    return new Promise((resolve, reject) => {
      const entry = this.#pending.get(key)
      if (entry) {
        this.#replace(entry, job)
        entry.urgent = true
        entry.waiters.push({ resolve, reject })
      } else {
        this.#add(key, { job, waiters: [{ resolve, reject }], urgent: true })
      }
      this.#pump()
    })
  }

  /**
   * Drops a session's queued job and waits for one being written, which will not be retried: afterwards the
   * caller may write or delete the session without an older copy landing after it.
   */
  async withdraw(key: string): Promise<void> {
    const entry = this.#pending.get(key)
    if (entry) this.#remove(key, entry)
    for (const waiter of entry?.waiters ?? []) waiter.resolve(WITHDRAWN)
    const running = this.#running.get(key)
    if (running) {
      running.withdrawn = true
      await running.done
    }
  }

  /** Resolves true once nothing is queued or being written, false if `timeoutMs` passes first. */
  flush(timeoutMs: number): Promise<boolean> {
    if (this.size === 0) return Promise.resolve(true)
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer)
        resolve(true)
      }
      const timer = setTimeout(() => {
        this.#idle = this.#idle.filter((waiter) => waiter !== done)
        resolve(false)
      }, timeoutMs)
      this.#idle.push(done)
      this.#pump()
    })
  }

  /** Stops retrying; queued jobs are kept. */
  stop(): void {
    clearTimeout(this.#retryTimer)
    this.#retryTimer = undefined
  }

  #pump(): void {
    for (const [key, entry] of this.#pending) {
      if (this.#running.has(key)) continue
      // Background writes wait while no node is alive (the retry timer) or when enough are running.
      if (!entry.urgent && (this.#retryTimer || this.#backgroundRunning >= this.#options.concurrency))
        continue
      this.#remove(key, entry)
      if (!entry.urgent) this.#backgroundRunning++
      const running: Running = { entry, done: Promise.resolve(), withdrawn: false }
      this.#running.set(key, running)
      running.done = this.#run(key, running)
    }
    if (this.size === 0) for (const done of this.#idle.splice(0)) done()
  }

  async #run(key: string, running: Running): Promise<void> {
    const { entry } = running
    try {
      const id = await this.#options.run(entry.job)
      this.#options.onWritten(key, entry.job, id)
      // Withdrawn while it ran: the destroy waiting for it comes next, and must find nothing to bring back.
      const outcome: JobOutcome = running.withdrawn ? WITHDRAWN : { written: true, id }
      for (const waiter of entry.waiters) waiter.resolve(outcome)
    } catch (error) {
      if (error instanceof AllNodesDownError) {
        // Degraded: keep the job (as a conditional write: others may write meanwhile) unless a newer one waits.
        for (const waiter of entry.waiters) waiter.resolve({ written: false })
        if (!running.withdrawn && !this.#pending.has(key)) {
          // Bounded like offer(): through a long outage every session written would otherwise wait here,
          // each with its whole record.
          if (!this.#fits(entry.job)) this.#options.onDropped(key, entry.job)
          else this.#add(key, { job: { ...entry.job, onlyIfNewer: true }, waiters: [], urgent: false })
        }
        this.#scheduleRetry()
      } else if (error instanceof StaleWriteError) {
        this.#options.onStale(key, entry.job, error)
        for (const waiter of entry.waiters) waiter.resolve({ written: false })
      } else {
        if (entry.waiters.length === 0) {
          this.#options.logger.error({ err: String(error) }, 'session-failover: backup could not be written')
        }
        for (const waiter of entry.waiters) waiter.reject(error)
      }
    } finally {
      this.#running.delete(key)
      if (!entry.urgent) this.#backgroundRunning--
      // A finished write may unblock a newer version of the same session.
      queueMicrotask(() => this.#pump())
    }
  }

  #fits(job: BackupJob): boolean {
    return (
      this.#pending.size < this.#options.maxPending &&
      this.#pendingBytes + recordBytes(job.record) <= this.#options.maxPendingBytes
    )
  }

  #add(key: string, entry: Entry): void {
    this.#pending.set(key, entry)
    this.#pendingBytes += recordBytes(entry.job.record)
  }

  #replace(entry: Entry, job: BackupJob): void {
    this.#pendingBytes += recordBytes(job.record) - recordBytes(entry.job.record)
    entry.job = job
  }

  #remove(key: string, entry: Entry): void {
    this.#pending.delete(key)
    this.#pendingBytes -= recordBytes(entry.job.record)
  }

  #scheduleRetry(): void {
    if (this.#retryTimer) return
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined
      this.#pump()
    }, this.#options.retryDelayMs)
    this.#retryTimer.unref()
  }
}
