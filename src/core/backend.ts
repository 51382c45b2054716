import type { ParsedSessionId } from '../session-id.js'
import type { SessionRecord } from './codec.js'
import type { LoadedSession } from './store.js'

/**
 * Where the engine keeps sessions: the replicated store itself (non-sticky), or local memory backed up to it
 * (sticky). Deals in ids and records only.
 */
export interface SessionBackend {
  newSessionId(): string
  /** The parsed id when it is well-formed and names a configured node; null otherwise. */
  recognize(id: string): ParsedSessionId | null
  /** Recently found on no node (or destroyed) by this instance: a new session, without reading any node. */
  knownAbsent(parsed: ParsedSessionId): boolean
  load(id: string): Promise<LoadedSession | null>
  /** Stores a record and returns the id the session has now (it changes when the session was relocated). */
  save(id: string, record: SessionRecord, ttlSeconds: number): Promise<string>
  /** Keeps an unchanged session alive; never rejects. */
  refresh(id: string, record: SessionRecord, ttlSeconds: number): Promise<void>
  destroy(id: string): Promise<void>
  /**
   * Whether destroy() from this instance ends the session everywhere. Not in sticky mode for a session another
   * instance serves: that one still holds it in memory and would write it back.
   */
  destroysEverywhere(parsed: ParsedSessionId): boolean
  /** Finishes pending work (async backups); the ring is closed by its owner. */
  /** `timeoutMs`: the longest to wait for writes still queued (sticky mode's backups). */
  close(timeoutMs?: number): Promise<void>
}
