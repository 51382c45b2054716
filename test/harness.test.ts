import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { fileURLToPath } from 'node:url'
import { describe, expect, it, vi } from 'vitest'
import { waitUntilListening } from './support/process.js'

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
  it('kills the servers and app instances a process started when that process is SIGKILLed (no exit handler runs)', async () => {
    const holder = spawn(
      process.execPath,
      ['--import', 'tsx', fileURLToPath(new URL('./support/server-holder.ts', import.meta.url))],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    )
    let pids: number[] = []
    try {
      pids = await new Promise<number[]>((resolve, reject) => {
        let output = ''
        holder.stdout?.on('data', (chunk: Buffer) => {
          output += chunk.toString()
          const found = [...output.matchAll(/PID (\d+)/g)].map((match) => Number(match[1]))
          if (found.length === 2) resolve(found)
        })
        holder.once('exit', () =>
          reject(new Error('the holder exited before starting its memcached and app')),
        )
      })
      expect(pids.map(running)).toEqual([true, true])
      holder.kill('SIGKILL')
      await vi.waitFor(() => expect(pids.map(running)).toEqual([false, false]), {
        timeout: 5000,
        interval: 20,
      })
    } finally {
      holder.kill('SIGKILL')
      for (const pid of pids) if (running(pid)) process.kill(pid, 'SIGKILL')
    }
  })

  it("does not take another process's listener on the port for the server it started", async () => {
    // Another test's server took the port first; the child started for it (here one that never listens) fails.
    const other = createServer()
    await new Promise<void>((resolve) => other.listen(0, '127.0.0.1', resolve))
    const port = (other.address() as { port: number }).port
    const child = spawn('sleep', ['30'], { stdio: 'ignore' })
    const killer = setTimeout(() => child.kill('SIGKILL'), 500)
    try {
      await expect(waitUntilListening(port, child)).rejects.toThrow(/exited .* before listening/)
    } finally {
      clearTimeout(killer)
      child.kill('SIGKILL')
      other.close()
    }
  })
})
