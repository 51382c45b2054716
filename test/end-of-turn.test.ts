import { execFileSync } from 'node:child_process'
import { describe, expect, it, vi } from 'vitest'
import { answerAtEndOfTurn, endOfTurn, sendAtEndOfTurn } from '../src/end-of-turn.js'

describe('work put off to the end of the turn', () => {
  it('runs every send before every answer, whatever order they were queued in, and nothing at once', async () => {
    const order: string[] = []
    answerAtEndOfTurn(() => order.push('answer 1'))
    sendAtEndOfTurn(() => order.push('send 1'))
    answerAtEndOfTurn(() => {
      order.push('answer 2')
      sendAtEndOfTurn(() => order.push('send queued by an answer'))
    })
    sendAtEndOfTurn(() => order.push('send 2'))
    await Promise.resolve()
    expect(order).toEqual([])
    await endOfTurn()
    // The send an answer queued leaves in the same end of turn, not a turn later.
    expect(order).toEqual(['send 1', 'send 2', 'answer 1', 'answer 2', 'send queued by an answer'])
  })

  it('is not held back by a faked setImmediate (a test suite using fake timers)', async () => {
    vi.useFakeTimers()
    try {
      const ran = vi.fn()
      answerAtEndOfTurn(ran)
      await endOfTurn()
      expect(ran).toHaveBeenCalledOnce()
    } finally {
      vi.useRealTimers()
    }
  })

  it('runs the other tasks when one throws, and the error still surfaces as an uncaught exception', () => {
    const script = `
      import { answerAtEndOfTurn, sendAtEndOfTurn } from './src/end-of-turn.ts'
      answerAtEndOfTurn(() => { throw new Error('boom') })
      answerAtEndOfTurn(() => console.log('answered'))
      sendAtEndOfTurn(() => console.log('sent'))
    `
    let result: { status: number | null; stdout: string; stderr: string }
    try {
      const stdout = execFileSync(
        process.execPath,
        ['--import', 'tsx', '--input-type=module', '-e', script],
        {
          encoding: 'utf8',
          stdio: 'pipe',
        },
      )
      result = { status: 0, stdout, stderr: '' }
    } catch (error) {
      result = error as { status: number | null; stdout: string; stderr: string }
    }
    expect(result.stdout).toBe('sent\nanswered\n')
    expect(result.status).toBe(1)
    expect(result.stderr).toContain('Error: boom')
  })
})
