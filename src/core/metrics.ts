import { EventEmitter } from 'node:events'
import type { Logger } from '../logger.js'
import { newCounters, type SessionCounters } from './counters.js'

/** Upper bounds (seconds) of the latency buckets: 50 µs to 10 s, the Prometheus way. */
export const LATENCY_BUCKETS: readonly number[] = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
]

export type LatencyName = 'load' | 'save' | 'lockWait' | 'serialize'

export interface LatencySummary {
  readonly count: number
  /** Seconds, estimated from the buckets (within one bucket's width). */
  readonly p50: number
  readonly p99: number
  readonly mean: number
}

/** A cumulative histogram over LATENCY_BUCKETS; the last slot counts what is above the largest bound. */
export class LatencyHistogram {
  readonly counts = new Array<number>(LATENCY_BUCKETS.length + 1).fill(0)
  count = 0
  sum = 0

  observe(seconds: number): void {
    let index = 0
    while (index < LATENCY_BUCKETS.length && seconds > (LATENCY_BUCKETS[index] as number)) index++
    this.counts[index] = (this.counts[index] as number) + 1
    this.count++
    this.sum += seconds
  }

  /** The q-quantile, interpolated within its bucket. */
  quantile(q: number): number {
    if (this.count === 0) return 0
    const rank = q * this.count
    let seen = 0
    for (let index = 0; index < this.counts.length; index++) {
      const inBucket = this.counts[index] as number
      if (seen + inBucket >= rank && inBucket > 0) {
        const lower = index === 0 ? 0 : (LATENCY_BUCKETS[index - 1] as number)
        const upper = LATENCY_BUCKETS[index] ?? lower
        return lower + (upper - lower) * ((rank - seen) / inBucket)
      }
      seen += inBucket
    }
    return LATENCY_BUCKETS[LATENCY_BUCKETS.length - 1] as number
  }

  summary(): LatencySummary {
    return {
      count: this.count,
      p50: this.quantile(0.5),
      p99: this.quantile(0.99),
      mean: this.count === 0 ? 0 : this.sum / this.count,
    }
  }
}

/**
 * What listeners of each event receive. A session is named by a 12-character hash of its id, never the id:
 * the id is the credential.
 */
export interface SessionEvents {
  /** A node failed an operation or timed out, and is skipped until a probe finds it answering. */
  nodeDown: { readonly node: string; readonly address: string; readonly error: string }
  nodeUp: { readonly node: string; readonly address: string; readonly downForMs: number }
  /** A session moved off a dead node (node failover); its cookie is reissued. */
  relocated: { readonly session: string; readonly from: string; readonly to: string }
  /** Sticky mode: this instance took over a session another instance owned (instance failover). */
  takeover: { readonly session: string; readonly fromRoute: string | undefined; readonly toRoute: string }
  /** No node took a session's backup copy: it has one copy until its next write. */
  backupFailed: { readonly session: string; readonly primary: string }
  lockTimeout: { readonly session: string; readonly path: string }
  /** A stored copy failed its integrity check, decryption or deserialization, and was not used. */
  corruptSession: { readonly session: string; readonly node: string | undefined; readonly reason: string }
}

export type SessionEventName = keyof SessionEvents

/**
 * Counters, latency histograms and events, shared by every part of one middleware. Listeners run
 * synchronously; one that throws is logged, never allowed to break the request that emitted.
 */
export class Metrics {
  readonly counters: SessionCounters = newCounters()
  readonly latency: Readonly<Record<LatencyName, LatencyHistogram>> = {
    load: new LatencyHistogram(),
    save: new LatencyHistogram(),
    lockWait: new LatencyHistogram(),
    serialize: new LatencyHistogram(),
  }
  // No listener limit: an application may well watch one event from more than ten places; Node would warn of a leak.
  readonly #events = new EventEmitter().setMaxListeners(0)
  /** Each listener as given, and the guard registered in its place. */
  readonly #guards = new Map<SessionEventName, Map<(payload: never) => unknown, (payload: unknown) => void>>()
  readonly #observers = new Set<(name: LatencyName, seconds: number) => void>()
  readonly #logger: Logger

  constructor(logger: Logger) {
    this.#logger = logger
  }

  emit<K extends SessionEventName>(name: K, payload: SessionEvents[K]): void {
    if (this.#events.listenerCount(name) > 0) this.#events.emit(name, payload)
  }

  /**
   * Each listener runs guarded: one that throws, or returns a promise that rejects, is logged; the others still
   * run and the request that emitted goes on.
   */
  on<K extends SessionEventName>(name: K, listener: (payload: SessionEvents[K]) => unknown): void {
    const guards = this.#guards.get(name) ?? new Map()
    this.#guards.set(name, guards)
    if (guards.has(listener)) return
    const logFailure = (error: unknown): void => {
      this.#logger.error({ event: name, err: String(error) }, 'session-failover: an event listener failed')
    }
    const guard = (payload: unknown): void => {
      try {
        const result = listener(payload as SessionEvents[K])
        if (result instanceof Promise) result.catch(logFailure)
      } catch (error) {
        logFailure(error)
      }
    }
    guards.set(listener, guard)
    this.#events.on(name, guard)
  }

  off<K extends SessionEventName>(name: K, listener: (payload: SessionEvents[K]) => unknown): void {
    const guard = this.#guards.get(name)?.get(listener)
    if (!guard) return
    this.#guards.get(name)?.delete(listener)
    this.#events.off(name, guard)
  }

  observe(name: LatencyName, seconds: number): void {
    this.latency[name].observe(seconds)
    for (const observer of this.#observers) observer(name, seconds)
  }

  /**
   * Times `work` into the `name` histogram, whether it succeeds or fails. Not an async function: it wraps the load,
   * the lock wait and the save of every request, and an async frame allocates more than two callbacks.
   */
  time<T>(name: LatencyName, work: () => Promise<T>): Promise<T> {
    const started = performance.now()
    let pending: Promise<T>
    try {
      pending = work()
    } catch (error) {
      this.observe(name, (performance.now() - started) / 1000)
      return Promise.reject(error)
    }
    return pending.then(
      (value) => {
        this.observe(name, (performance.now() - started) / 1000)
        return value
      },
      (error: unknown) => {
        this.observe(name, (performance.now() - started) / 1000)
        throw error
      },
    )
  }

  timeSync<T>(name: LatencyName, work: () => T): T {
    const started = performance.now()
    try {
      return work()
    } finally {
      this.observe(name, (performance.now() - started) / 1000)
    }
  }

  /** Each observation as it happens (the Prometheus bridge uses it to feed its own histograms). */
  onObservation(observer: (name: LatencyName, seconds: number) => void): () => void {
    this.#observers.add(observer)
    return () => this.#observers.delete(observer)
  }
}
