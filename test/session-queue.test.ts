import { describe, expect, it } from 'vitest'
import { SessionQueues, type Turn } from '../src/core/session-queue.js'

/** Whether `turn` may run once the microtasks queued so far have run. */
async function runs(turn: Turn): Promise<boolean> {
  if (turn.ready === undefined) return true
  let ran = false
  void turn.ready.then(() => {
    ran = true
  })
  await new Promise((resolve) => setImmediate(resolve))
  return ran
}

describe('SessionQueues', () => {
  it('runs one request of a session at a time, in arrival order, and other sessions beside it', async () => {
    const queues = new SessionQueues()
    const first = queues.join('a')
    const second = queues.join('a')
    const third = queues.join('a')
    const other = queues.join('b')
    expect(first.ready).toBeUndefined()
    expect(other.ready).toBeUndefined()
    expect([await runs(second), await runs(third)]).toEqual([false, false])
    expect(first.followed()).toBe(true)

    // Only the running request is asked: one still waiting, or one that left, is never "followed".
    expect(second.followed()).toBe(false)
    first.leave()
    expect(first.followed()).toBe(false)
    expect([await runs(second), await runs(third)]).toEqual([true, false])
    expect(second.followed()).toBe(true)
    second.leave()
    expect(await runs(third)).toBe(true)
    expect(third.followed()).toBe(false)
  })

  it('skips a request that gave up waiting, and passes the turn on once however often it is left', async () => {
    const queues = new SessionQueues()
    const running = queues.join('a')
    const gaveUp = queues.join('a')
    const next = queues.join('a')
    const last = queues.join('a')
    gaveUp.leave()
    running.leave()
    running.leave()
    expect(await runs(next)).toBe(true)
    expect(await runs(last)).toBe(false)
    expect(await runs(gaveUp)).toBe(false)
    // Leaving again after giving up takes nobody's turn.
    gaveUp.leave()
    expect(await runs(last)).toBe(false)
    next.leave()
    expect(await runs(last)).toBe(true)
  })

  it('keeps a running request alone when every request behind it gave up', async () => {
    const queues = new SessionQueues()
    const running = queues.join('a')
    const gaveUp = queues.join('a')
    gaveUp.leave()
    // The session still has a running request: a newcomer waits for it rather than running beside it.
    const newcomer = queues.join('a')
    expect(await runs(newcomer)).toBe(false)
    running.leave()
    expect(await runs(newcomer)).toBe(true)
  })

  it('forgets a session once its last request left', async () => {
    const queues = new SessionQueues()
    const alone = queues.join('a')
    expect(alone.followed()).toBe(false)
    alone.leave()
    const later = queues.join('a')
    expect(later.ready).toBeUndefined()
    // A request that already left never counts as followed, nor lets a newer one go twice.
    const behind = queues.join('a')
    alone.leave()
    expect(alone.followed()).toBe(false)
    expect(await runs(behind)).toBe(false)
    later.leave()
    expect(await runs(behind)).toBe(true)
  })
})
