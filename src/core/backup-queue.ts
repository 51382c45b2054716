import { AllNodesDownError } from '../errors.js'
import type { Logger } from '../logger.js'
import type { SessionRecord } from './codec.js'

export interface BackupJob {
  readonly id: string
  readonly record: SessionRecord
  readonly ttlSeconds: number
}

export interface BackupQueueOptions {
  /** Most sessions waiting; past it offer() refuses and the caller writes synchronously. */
  readonly maxPending: number
  /** Writes running at once. */
  readonly concurrency: number
  /** Wait before retrying while no node is alive. */
  readonly retryDelayMs: number
  /** Writes one backup; resolves with the session's id afterwards (it changes on relocation). */
  readonly write: (job: BackupJob) => Promise<string>
  readonly onWritten: (key: string, job: BackupJob, id: string) => void
  readonly logger: Logger
}

/**
 * Backups written after the response (sticky mode's `backupAsync`, and any sticky write made while every node
 * was down). One pending job per session: a newer write replaces the queued one (coalescing), and a session is
 * never written by two jobs at once, so the newest copy is the one that lands. While no node is alive jobs stay
 * queued and are retried; nothing is dropped silently.
 */
export class BackupQueue {
  readonly #options: BackupQueueOptions
  readonly #pending = new Map<string, BackupJob>()
  readonly #inFlight = new Map<string, Promise<void>>()
  #retryTimer: NodeJS.Timeout | undefined
  #idle: Array<() => void> = []

  constructor(options: BackupQueueOptions) {
    this.#options = options
  }

  /** Sessions waiting or being written. */
  get size(): number {
    return this.#pending.size + this.#inFlight.size
  }

  has(key: string): boolean {
    return this.#pending.has(key) || this.#inFlight.has(key)
  }

  /** Queues (or replaces) the backup of one session; false when the queue is full. */
  offer(key: string, job: BackupJob): boolean {
    if (!this.#pending.has(key) && this.#pending.size >= this.#options.maxPending) return false
    this.#pending.set(key, job)
    this.#pump()
    return true
  }

  /**
   * Removes a session's queued job and waits for one being written: afterwards the caller may write or delete
   * the session without an older queued copy landing after it.
   */
  async withdraw(key: string): Promise<void> {
    this.#pending.delete(key)
    await this.#inFlight.get(key)
  }

  /** Resolves true once nothing is queued or being written, false if `timeoutMs` passes first. */
  flush(timeoutMs: number): Promise<boolean> {
    if (this.size === 0) return Promise.resolve(true)
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#idle = this.#idle.filter((waiter) => waiter !== done)
        resolve(false)
      }, timeoutMs)
      const done = (): void => {
        clearTimeout(timer)
        resolve(true)
      }
      this.#idle.push(done)
      this.#pump()
    })
  }

  /** Stops retrying; queued jobs are kept (a later flush() can still write them). */
  stop(): void {
    clearTimeout(this.#retryTimer)
    this.#retryTimer = undefined
  }

  #pump(): void {
    if (this.#retryTimer) return
    for (const [key, job] of this.#pending) {
      if (this.#inFlight.size >= this.#options.concurrency) break
      if (this.#inFlight.has(key)) continue
      this.#pending.delete(key)
      this.#inFlight.set(key, this.#run(key, job))
    }
    if (this.size === 0) for (const done of this.#idle.splice(0)) done()
  }

  async #run(key: string, job: BackupJob): Promise<void> {
    try {
      const id = await this.#options.write(job)
      this.#options.onWritten(key, job, id)
    } catch (error) {
      if (error instanceof AllNodesDownError) {
        // Keep it unless a newer version is already waiting, and try again once a node may be back.
        if (!this.#pending.has(key)) this.#pending.set(key, job)
        this.#scheduleRetry()
      } else {
        this.#options.logger.error({ err: String(error) }, 'session-failover: backup could not be written')
      }
    } finally {
      this.#inFlight.delete(key)
      // A write that finished may unblock a newer version of the same session.
      queueMicrotask(() => this.#pump())
    }
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
