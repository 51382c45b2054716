/** A request's place in its session's queue in this process. */
export interface Turn {
  /** Settles when the request may run; undefined when it could at once (no request of the session was running). */
  readonly ready: Promise<void> | undefined
  /** Whether this request is the running one and a request of the session waits behind it. */
  followed(): boolean
  /** Lets the next request of the session run, or gives up waiting. Idempotent. */
  leave(): void
}

/**
 * This process's requests of each session, first come first served: one runs (it holds or takes the session's
 * lock), the others wait for it. Only a request that really waits allocates a promise. Most sessions have one
 * request at a time, and a promise chain built for every request allocated more than the rest of the lock's
 * bookkeeping (bench:profile --alloc).
 */
export class SessionQueues {
  /** Per session with a running request, the requests waiting behind it, oldest first. */
  readonly #waiting = new Map<string, QueueTurn[]>()

  join(key: string): Turn {
    const line = this.#waiting.get(key)
    if (line === undefined) {
      const fresh: QueueTurn[] = []
      this.#waiting.set(key, fresh)
      return new QueueTurn(this.#waiting, key, fresh, false)
    }
    const turn = new QueueTurn(this.#waiting, key, line, true)
    line.push(turn)
    return turn
  }
}

class QueueTurn implements Turn {
  readonly ready: Promise<void> | undefined
  readonly #queues: Map<string, QueueTurn[]>
  readonly #key: string
  readonly #line: QueueTurn[]
  #state: 'waiting' | 'running' | 'left'
  #wake: (() => void) | undefined

  constructor(queues: Map<string, QueueTurn[]>, key: string, line: QueueTurn[], waits: boolean) {
    this.#queues = queues
    this.#key = key
    this.#line = line
    this.#state = waits ? 'waiting' : 'running'
    this.ready = waits
      ? new Promise<void>((resolve) => {
          this.#wake = resolve
        })
      : undefined
  }

  followed(): boolean {
    return this.#state === 'running' && this.#line.length > 0
  }

  leave(): void {
    if (this.#state === 'left') return
    const wasRunning = this.#state === 'running'
    this.#state = 'left'
    if (!wasRunning) {
      this.#line.splice(this.#line.indexOf(this), 1)
      return
    }
    const next = this.#line.shift()
    if (next) next.#run()
    else if (this.#queues.get(this.#key) === this.#line) this.#queues.delete(this.#key)
  }

  #run(): void {
    this.#state = 'running'
    this.#wake?.()
  }
}
