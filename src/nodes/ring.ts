import type { Metrics } from '../core/metrics.js'
import { ClosedError, NodeRejectedError } from '../errors.js'
import type { Logger } from '../logger.js'
import type { SessionNode } from './node.js'
import { withTimeout } from './timeout.js'

interface Member {
  readonly node: SessionNode
  /** Used only when no other node is alive (MSM's failoverNodes): typically the memcached on this host. */
  readonly failover: boolean
  /**
   * Removed by setNodes(): never used again, but still known, so that ids naming it are recognized and their
   * sessions move to the other nodes (from their backups) as they are used.
   */
  retired: boolean
  alive: boolean
  ops: number
  errors: number
  deadSince: number | undefined
  /** Epoch ms the node was last marked dead, kept once it is back; 0 if never. */
  lastDownAt: number
  lastError: string | undefined
  probeTimer: NodeJS.Timeout | undefined
  /**
   * Keys to delete on this node before it counts as alive again: undefined deletes whatever is there (a session
   * destroyed while the node was dead), a list only one of those values (a lock add or a write that timed out
   * and may land late). Entries are replaced, never changed in place, so a probe can tell one it did not run.
   */
  readonly pendingDeletes: Map<string, readonly Buffer[] | undefined>
  /**
   * Copies this node still holds of sessions moved off it while it was dead, each with a test that recognizes
   * the copy: deleted once it is back, oldest first. Apart from pendingDeletes, so that many moves cannot push a
   * destroy out, and they do not hold the node back: the instance that moved a session follows the move itself.
   */
  readonly oldCopies: Map<string, (stored: Buffer) => boolean>
  /** call()'s rejection handler, made once per node: counts the error, marks the node dead unless it refused. */
  readonly failed: (error: unknown) => never
  /** A delete this node owed and refused: left undone, and said once (see refusedAside). */
  readonly refused: (error: NodeRejectedError) => void
  refusedBefore: boolean
}

/** Most deletes remembered per dead node; past it the oldest are forgotten (and a warning says so). */
const MAX_PENDING_DELETES = 50_000
/** Most copies from before a move remembered per dead node; past it the oldest are forgotten. */
const MAX_OLD_COPIES = 20_000
/** Copies from before a move deleted at once on a node that is back, so that they come in bounded bursts. */
const OLD_COPIES_AT_ONCE = 64

const ignore = (): void => {}

export interface NodeHealth {
  readonly id: string
  readonly address: string
  readonly alive: boolean
  /** Epoch ms when the node was last marked dead; undefined while alive. */
  readonly deadSince: number | undefined
  readonly lastError: string | undefined
  /** Operations sent to the node, and how many of them failed (refusals included), since start. */
  readonly ops: number
  readonly errors: number
}

export interface RingOptions {
  /** Ids of nodes used only when no other node is alive. */
  readonly failoverNodeIds: ReadonlySet<string>
  readonly probeIntervalMs: number
  readonly logger: Logger
  readonly metrics: Metrics
}

/**
 * The configured nodes in their configured order, with health. A failed or timed-out operation marks a node
 * dead; dead nodes are skipped at once and a background probe brings them back, so no request ever waits on a
 * node already known to be dead.
 */
export class NodeRing {
  /** Configured nodes in configured order, then retired ones. */
  #members: Member[]
  readonly #byId = new Map<string, Member>()
  readonly #options: RingOptions
  #roundRobin = 0
  #closed = false

  constructor(nodes: readonly SessionNode[], options: RingOptions) {
    this.#options = options
    this.#members = nodes.map((node) => this.#member(node))
    for (const member of this.#members) this.#byId.set(member.node.id, member)
  }

  /** Removed by setNodes(): such an id can never be configured again. */
  isRetired(nodeId: string): boolean {
    return this.#byId.get(nodeId)?.retired === true
  }

  get closed(): boolean {
    return this.#closed
  }

  /**
   * Replaces the configured nodes (setNodes): `nodes` in their new order, reusing the member of an id that
   * stays. A removed node is retired and its connections closed.
   */
  update(nodes: readonly SessionNode[]): void {
    const next = nodes.map((node) => {
      const existing = this.#byId.get(node.id)
      if (existing && !existing.retired && existing.node === node) return existing
      const member = this.#member(node)
      if (existing) clearTimeout(existing.probeTimer)
      this.#byId.set(node.id, member)
      return member
    })
    const kept = new Set(next)
    const retired = [...this.#byId.values()].filter((member) => !kept.has(member))
    for (const member of retired) {
      if (!member.retired) {
        member.retired = true
        member.alive = false
        member.deadSince ??= Date.now()
        member.pendingDeletes.clear()
        member.oldCopies.clear()
        clearTimeout(member.probeTimer)
        void member.node.close().catch(ignore)
      }
    }
    this.#members = [...next, ...retired]
    this.#roundRobin = 0
  }

  has(nodeId: string): boolean {
    return this.#byId.has(nodeId)
  }

  /** In the current node list: neither unknown nor removed by setNodes(). */
  isConfigured(nodeId: string): boolean {
    const member = this.#byId.get(nodeId)
    return member !== undefined && !member.retired
  }

  /** Whether the node applies operations on different keys in the order they are issued (SessionNode.ordered). */
  isOrdered(nodeId: string): boolean {
    return this.#byId.get(nodeId)?.node.ordered === true
  }

  isAlive(nodeId: string): boolean {
    return this.#byId.get(nodeId)?.alive === true
  }

  /**
   * Whether the node is alive and has not been marked dead since `at` (epoch ms): what was written to it then may
   * have been moved on since, by an instance that saw it fail.
   */
  aliveSince(nodeId: string, at: number): boolean {
    const member = this.#byId.get(nodeId)
    return member?.alive === true && member.lastDownAt < at
  }

  /** Configured nodes, retired ones not counted. */
  get size(): number {
    // Asked on every save (it bounds the write's attempts): counted without building an array.
    let count = 0
    for (const member of this.#members) if (!member.retired) count++
    return count
  }

  /**
   * The largest value every node stores under a key of `keyBytes` bytes, as far as they have said (memcached's
   * item size); Infinity when none has. Asked on every write: a loop, no array.
   */
  largestValue(keyBytes: number): number {
    let largest = Number.POSITIVE_INFINITY
    for (const member of this.#members) {
      const limit = member.retired ? undefined : member.node.largestValue?.(keyBytes)
      if (limit !== undefined && limit < largest) largest = limit
    }
    return largest
  }

  anyAlive(): boolean {
    return this.#members.some((member) => member.alive)
  }

  aliveIds(): string[] {
    return this.#members.filter((member) => member.alive).map((member) => member.node.id)
  }

  firstNodeId(): string {
    const first = this.#members[0]
    if (!first) throw new Error('a ring needs at least one node')
    return first.node.id
  }

  /**
   * Round-robin over alive nodes, so new sessions spread evenly; failover nodes only when no other node is alive.
   * Undefined when none is alive.
   */
  nodeForNewSession(): string | undefined {
    const count = this.#members.length
    for (const failover of [false, true]) {
      for (let step = 0; step < count; step++) {
        const member = this.#members[(this.#roundRobin + step) % count]
        if (member?.alive && member.failover === failover) {
          this.#roundRobin = (this.#roundRobin + step + 1) % count
          return member.node.id
        }
      }
    }
    return undefined
  }

  /**
   * The first alive node after `nodeId` in configured order, skipping `exclude`, and preferring nodes that are
   * not failover nodes. This is where the backup of a session whose primary is `nodeId` lives, and where the
   * session moves when `nodeId` dies: the choice is deterministic, so instances that fail over the same session
   * at once agree on its new home.
   */
  nextAliveAfter(nodeId: string, exclude?: ReadonlySet<string>): string | undefined {
    const count = this.#members.length
    // A node this instance does not know (removed before it started) counts as coming before the first.
    const start = this.#members.findIndex((member) => member.node.id === nodeId)
    const steps = start === -1 ? count : count - 1
    for (const failover of [false, true]) {
      for (let step = 1; step <= steps; step++) {
        const member = this.#members[(start + step) % count]
        if (
          member?.alive &&
          member.failover === failover &&
          member.node.id !== nodeId &&
          !exclude?.has(member.node.id)
        ) {
          return member.node.id
        }
      }
    }
    return undefined
  }

  /** Alive nodes other than `nodeId`, in configured order starting after it. */
  aliveOthers(nodeId: string): string[] {
    const others: string[] = []
    const count = this.#members.length
    const start = this.#members.findIndex((member) => member.node.id === nodeId)
    const steps = start === -1 ? count : count - 1
    for (let step = 1; step <= steps; step++) {
      const member = this.#members[(start + step) % count]
      if (member?.alive && member.node.id !== nodeId) others.push(member.node.id)
    }
    return others
  }

  /**
   * Runs one operation on one node. A connection failure or timeout marks the node dead and rethrows; a node
   * that refused the operation (NodeRejectedError) stays alive.
   */
  call<T>(nodeId: string, operation: (node: SessionNode) => Promise<T>): Promise<T> {
    const member = this.#byId.get(nodeId)
    if (!member) return Promise.reject(new Error(`unknown node ${nodeId}`))
    // After close() nothing reaches a node, and no node is marked dead for it.
    if (this.#closed)
      return Promise.reject(new ClosedError('session-failover was closed; no node is reachable'))
    member.ops++
    // Not an async function: every node operation of every request passes here, and an async frame around it
    // allocates about as much again as the operation's own promise (bench:profile --alloc).
    let pending: Promise<T>
    try {
      pending = operation(member.node)
    } catch (error) {
      pending = Promise.reject(error)
    }
    return pending.then(undefined, member.failed)
  }

  /** Sets `key` on every node alive now; a node that fails is marked dead, as by any call. */
  async writeEverywhere(key: string, value: Buffer, ttlSeconds: number): Promise<void> {
    await Promise.allSettled(
      this.#members
        .filter((member) => !member.retired && member.alive)
        .map((member) => this.call(member.node.id, (node) => node.set(key, value, ttlSeconds))),
    )
  }

  /**
   * Deletes `keys` on every node: now on the alive ones, and on each dead one before it counts as alive again,
   * so that a node that was down (or frozen) cannot bring a destroyed session back. Resolves whether any node
   * took the delete now.
   */
  async deleteEverywhere(keys: readonly string[]): Promise<boolean> {
    const results = await Promise.all(
      this.#members
        .filter((member) => !member.retired)
        .map(async (member) => {
          if (member.alive) {
            try {
              await this.call(member.node.id, (node) => Promise.all(keys.map((key) => node.delete(key))))
              return true
            } catch {
              // marked dead by call(): remembered below
            }
          }
          this.#rememberDeletes(member, keys)
          return false
        }),
    )
    return results.some(Boolean)
  }

  /**
   * For a node a request failed on: once it answers again, delete `key` there if it still holds `value`, before
   * it counts as alive. An add that timed out (a frozen node runs its buffered requests when it resumes) may have
   * taken a lock nobody will release; a write that timed out may land there. If its probe has found it back
   * already (the write that moved the session took longer than a probe interval), the delete is made now: the
   * probe's answer came after every request it had buffered, so the value is there to find.
   */
  deleteWhenBack(nodeId: string, key: string, value: Buffer): void {
    const member = this.#byId.get(nodeId)
    if (!member || member.retired) return
    if (!member.alive) {
      this.#rememberDeletes(member, [key], value)
      return
    }
    this.call(nodeId, (node) => deleteOn(node, key, [value], member.refused)).catch(() => {
      // Failed again, so marked dead: the delete waits for its next return.
      if (!member.alive) this.#rememberDeletes(member, [key], value)
    })
  }

  /**
   * A node a session was moved off, while it was dead: once it answers again (now, if it already does), delete
   * `key` there if `isOldCopy` recognizes what it holds (the copy from before the move, not one written since).
   */
  deleteOldCopyWhenBack(nodeId: string, key: string, isOldCopy: (stored: Buffer) => boolean): void {
    const member = this.#byId.get(nodeId)
    if (!member || member.retired) return
    if (member.alive) {
      void this.#deleteOldCopy(member, key, isOldCopy)
      return
    }
    member.oldCopies.delete(key)
    member.oldCopies.set(key, isOldCopy)
    if (member.oldCopies.size > MAX_OLD_COPIES)
      member.oldCopies.delete(member.oldCopies.keys().next().value as string)
  }

  /**
   * health(): asks each configured node nothing was sent to yet (no request came, or setNodes() just added it),
   * once. A node counts as alive until something sent to it fails, so without this an instance that serves no
   * request (one a readiness check keeps out of traffic) would call a node that cannot be reached alive forever.
   */
  askUnasked(): void {
    if (this.#closed) return
    for (const member of this.#members) {
      if (!member.retired && member.alive && member.ops === 0)
        this.call(member.node.id, (node) => node.ping()).catch(ignore)
    }
  }

  /** Configured nodes only: a retired node is no longer any operator's concern. */
  health(): NodeHealth[] {
    return this.#members
      .filter((member) => !member.retired)
      .map((member) => ({
        id: member.node.id,
        address: member.node.address,
        alive: member.alive,
        deadSince: member.deadSince,
        lastError: member.lastError,
        ops: member.ops,
        errors: member.errors,
      }))
  }

  /**
   * close(): one last try at what this instance owes nodes that are down (the deletes of destroys, and of writes
   * that may land late; copies left behind by moves), before it is forgotten: no other instance knows of it. A
   * node back by now takes it; what a node still down (or not answering by `latestAt`, epoch ms) is owed is lost
   * with this instance, and a warning says so.
   */
  async settleOwed(latestAt: number): Promise<void> {
    const owing = this.#members.filter(
      (member) => !member.retired && !member.alive && member.pendingDeletes.size + member.oldCopies.size > 0,
    )
    await Promise.all(owing.map((member) => this.#settle(member, latestAt)))
  }

  async #settle(member: Member, latestAt: number): Promise<void> {
    clearTimeout(member.probeTimer)
    const { node } = member
    const deletes = [...member.pendingDeletes]
    const copies = [...member.oldCopies]
    const waitMs = latestAt - Date.now()
    let failure = 'no time left'
    if (waitMs > 0) {
      const attempt = node
        .ping()
        .then(() =>
          Promise.all([
            ...deletes.map(([key, values]) => deleteOn(node, key, values, member.refused)),
            ...copies.map(([key, isOldCopy]) => deleteIfStill(node, key, isOldCopy, member.refused)),
          ]),
        )
      try {
        await withTimeout(attempt, waitMs, () => `${node.address}, owed deletes at close()`)
        member.pendingDeletes.clear()
        member.oldCopies.clear()
        return
      } catch (error) {
        failure = error instanceof Error ? error.message : String(error)
      }
    }
    this.#options.logger.warn(
      {
        node: node.id,
        address: node.address,
        deletes: deletes.length,
        oldCopies: copies.length,
        err: failure,
      },
      'session-failover: closed owing deletes to a node that is down; if it comes back with its data, it still holds those sessions',
    )
  }

  async close(): Promise<void> {
    this.#closed = true
    for (const member of this.#members) clearTimeout(member.probeTimer)
    await Promise.allSettled(this.#members.map((member) => member.node.close()))
  }

  #member(node: SessionNode): Member {
    const member: Member = {
      node,
      failover: this.#options.failoverNodeIds.has(node.id),
      retired: false,
      alive: true,
      ops: 0,
      errors: 0,
      deadSince: undefined,
      lastDownAt: 0,
      lastError: undefined,
      probeTimer: undefined,
      pendingDeletes: new Map<string, readonly Buffer[] | undefined>(),
      oldCopies: new Map(),
      refusedBefore: false,
      refused: (error: NodeRejectedError) => {
        member.lastError = error.message
        if (member.refusedBefore) return
        member.refusedBefore = true
        this.#options.logger.warn(
          { node: node.id, err: error.message },
          'session-failover: a node refused a delete owed to it since it was down; such values stay there',
        )
      },
      failed: (error: unknown) => {
        member.errors++
        if (!(error instanceof NodeRejectedError)) this.#markDead(member, error)
        throw error
      },
    }
    return member
  }

  #markDead(member: Member, error: unknown): void {
    member.lastError = error instanceof Error ? error.message : String(error)
    if (!member.alive) return
    member.alive = false
    member.deadSince = Date.now()
    member.lastDownAt = member.deadSince
    this.#options.logger.warn(
      { node: member.node.id, address: member.node.address, err: member.lastError },
      'session-failover: node marked dead',
    )
    this.#options.metrics.emit('nodeDown', {
      node: member.node.id,
      address: member.node.address,
      error: member.lastError,
    })
    this.#scheduleProbe(member)
  }

  #rememberDeletes(member: Member, keys: readonly string[], ifValue?: Buffer): void {
    // A retired node is never read again (its id cannot come back), so nothing needs deleting there.
    if (member.retired) return
    for (const key of keys) {
      // A delete of whatever is there (a destroy) is never narrowed to a delete of one value.
      const pending = member.pendingDeletes.get(key)
      if (ifValue && member.pendingDeletes.has(key) && pending === undefined) continue
      // Several writes of one key may have failed (parallel requests): any of them may be the one that lands.
      member.pendingDeletes.set(key, ifValue ? [...(pending ?? []), ifValue] : undefined)
    }
    if (member.pendingDeletes.size <= MAX_PENDING_DELETES) return
    for (const key of member.pendingDeletes.keys()) {
      member.pendingDeletes.delete(key)
      if (member.pendingDeletes.size <= MAX_PENDING_DELETES) break
    }
    this.#options.logger.warn(
      { node: member.node.id },
      'session-failover: too many deletes waiting for a dead node; the oldest are forgotten',
    )
  }

  async #deleteOldCopies(member: Member): Promise<void> {
    const copies = [...member.oldCopies]
    member.oldCopies.clear()
    let at = 0
    for (; at < copies.length && member.alive; at += OLD_COPIES_AT_ONCE) {
      const batch = copies.slice(at, at + OLD_COPIES_AT_ONCE)
      await Promise.all(batch.map(([key, isOldCopy]) => this.#deleteOldCopy(member, key, isOldCopy)))
    }
    // Dead again before the end: the rest waits for its next return.
    for (const [key, isOldCopy] of copies.slice(at)) {
      if (!member.oldCopies.has(key)) this.deleteOldCopyWhenBack(member.node.id, key, isOldCopy)
    }
  }

  /** Never rejects: a delete that failed because the node failed again waits for its next return. */
  #deleteOldCopy(member: Member, key: string, isOldCopy: (stored: Buffer) => boolean): Promise<void> {
    return this.call(member.node.id, (node) => deleteIfStill(node, key, isOldCopy, member.refused)).catch(
      () => {
        if (!member.alive && !member.oldCopies.has(key))
          this.deleteOldCopyWhenBack(member.node.id, key, isOldCopy)
      },
    )
  }

  #scheduleProbe(member: Member): void {
    if (this.#closed || member.retired) return
    clearTimeout(member.probeTimer)
    member.probeTimer = setTimeout(() => {
      const node = member.node
      const deletes = [...member.pendingDeletes]
      node
        .ping()
        .then(() => Promise.all(deletes.map(([key, values]) => deleteOn(node, key, values, member.refused))))
        .then(
          () => {
            if (member.retired) return
            // Only the entries this probe ran: one replaced meanwhile (a destroy) is still to be done.
            for (const [key, values] of deletes) {
              if (member.pendingDeletes.get(key) === values) member.pendingDeletes.delete(key)
            }
            const downForMs = Date.now() - (member.deadSince ?? Date.now())
            member.alive = true
            member.deadSince = undefined
            member.probeTimer = undefined
            this.#options.logger.info({ node: member.node.id, downForMs }, 'session-failover: node is back')
            this.#options.metrics.emit('nodeUp', {
              node: member.node.id,
              address: member.node.address,
              downForMs,
            })
            if (member.oldCopies.size > 0) void this.#deleteOldCopies(member)
            // Deletes remembered while this probe ran.
            const late = [...member.pendingDeletes]
            member.pendingDeletes.clear()
            if (late.length > 0) {
              this.call(node.id, (n) =>
                Promise.all(late.map(([key, values]) => deleteOn(n, key, values, member.refused))),
              ).catch(() => {
                for (const [key, values] of late) {
                  if (values === undefined) this.#rememberDeletes(member, [key])
                  else for (const value of values) this.#rememberDeletes(member, [key], value)
                }
              })
            }
          },
          (error: unknown) => {
            member.lastError = error instanceof Error ? error.message : String(error)
            this.#scheduleProbe(member)
          },
        )
    }, this.#options.probeIntervalMs)
    member.probeTimer.unref()
  }
}

/** Deletes `key`, or only if it holds one of `values` (compare-and-set, so a newer value is never removed). */
function deleteOn(
  node: SessionNode,
  key: string,
  values: readonly Buffer[] | undefined,
  refused: (error: NodeRejectedError) => void,
): Promise<void> {
  if (!values) return refusedAside(node.delete(key), refused)
  return deleteIfStill(node, key, (stored) => values.some((value) => stored.equals(value)), refused)
}

/** Deletes `key` if what it holds passes `matches`, with a compare-and-set, so a newer value is never removed. */
function deleteIfStill(
  node: SessionNode,
  key: string,
  matches: (stored: Buffer) => boolean,
  refused: (error: NodeRejectedError) => void,
): Promise<void> {
  return refusedAside(
    node.gets(key).then((current) => {
      if (current && matches(current.value)) return node.deleteIfUnchanged(key, current.cas)
    }),
    refused,
  )
}

/**
 * A delete the node refuses (memcached -C cannot delete only if unchanged; Redis answers an error such as
 * WRONGTYPE) is reported and left undone: it must not keep the node from coming back, and an unconditional
 * delete instead could remove a newer value.
 */
async function refusedAside(
  deleting: Promise<unknown>,
  refused: (error: NodeRejectedError) => void,
): Promise<void> {
  try {
    await deleting
  } catch (error) {
    if (!(error instanceof NodeRejectedError)) throw error
    refused(error)
  }
}
