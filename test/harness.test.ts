import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { describe, expect, it, vi } from 'vitest'

/** Gone, or a zombie nobody has reaped yet: either way no longer running. */
function running(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z'
  } catch {
    return false
  }
}

describe('the test harness', () => {
  it('kills the servers a process started when that process is SIGKILLed (no exit handler runs)', async () => {
    const holder = spawn(
      process.execPath,
      ['--import', 'tsx', fileURLToPath(new URL('./support/server-holder.ts', import.meta.url))],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    )
    let pid = 0
    try {
      pid = await new Promise<number>((resolve, reject) => {
        let output = ''
        holder.stdout?.on('data', (chunk: Buffer) => {
          output += chunk.toString()
          const match = /PID (\d+)/.exec(output)
          if (match) resolve(Number(match[1]))
        })
        holder.once('exit', () => reject(new Error('the holder exited before starting its server')))
      })
      expect(running(pid)).toBe(true)
      holder.kill('SIGKILL')
      await vi.waitFor(() => expect(running(pid)).toBe(false), { timeout: 5000, interval: 20 })
    } finally {
      holder.kill('SIGKILL')
      if (pid && running(pid)) process.kill(pid, 'SIGKILL')
    }
  })
})
