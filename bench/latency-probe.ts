// Preloaded into the benchmark app by `bench/profile.ts --latency`: where a request's latency goes when it is not
// this process's CPU profile. Each request's time inside the app (from Node's diagnostics channels: arrival of
// its headers to the end of its response), the garbage collector's pauses by kind, the event loop's delay and the
// app's CPU time per request. Written to LATENCY_PROFILE as JSON on SIGINT, before the app's own SIGINT listener
// exits (this one is registered first).
import { subscribe } from 'node:diagnostics_channel'
import { writeFileSync } from 'node:fs'
import type { IncomingMessage, ServerResponse } from 'node:http'
import {
  monitorEventLoopDelay,
  type PerformanceEntry,
  PerformanceObserver,
  performance,
} from 'node:perf_hooks'

export interface LatencyProfile {
  /** Milliseconds in the app per request, sorted, by method. */
  readonly inApp: Record<string, number[]>
  /** Garbage collections by kind (V8's names): how many, their pauses' total and longest, in ms. */
  readonly gc: Record<string, { count: number; totalMs: number; maxMs: number }>
  /** The event loop's delay, ms (a 1 ms timer's lateness). */
  readonly loopDelay: { p50: number; p99: number; max: number }
  /** App CPU per request since the first request, µs. */
  readonly cpuMicrosPerRequest: number
  /** Wall time since the first request, ms. */
  readonly wallMs: number
}

const out = process.env.LATENCY_PROFILE
if (out) {
  const inApp: Record<string, number[]> = {}
  const arrived = new WeakMap<ServerResponse, number>()
  let first: { cpu: NodeJS.CpuUsage; at: number } | undefined
  let requests = 0
  // Everything is counted from the first request: the app's start-up (modules, JIT) is not the load's.
  const delay = monitorEventLoopDelay({ resolution: 1 })
  subscribe('http.server.request.start', (message) => {
    if (!first) {
      first = { cpu: process.cpuUsage(), at: performance.now() }
      delay.enable()
    }
    arrived.set((message as { response: ServerResponse }).response, performance.now())
  })
  subscribe('http.server.response.finish', (message) => {
    const { request, response } = message as { request: IncomingMessage; response: ServerResponse }
    const at = arrived.get(response)
    if (at === undefined) return
    requests++
    const method = request.method ?? '?'
    inApp[method] ??= []
    inApp[method].push(performance.now() - at)
  })

  const gcKinds: Record<number, string> = {
    1: 'scavenge',
    2: 'minor mark-compact',
    4: 'mark-compact',
    8: 'incremental',
    16: 'weak callbacks',
  }
  const gc: LatencyProfile['gc'] = {}
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries() as Array<PerformanceEntry & { detail?: { kind?: number } }>) {
      if (!first || entry.startTime < first.at) continue
      const kind = gcKinds[entry.detail?.kind ?? 0] ?? String(entry.detail?.kind)
      gc[kind] ??= { count: 0, totalMs: 0, maxMs: 0 }
      const summary = gc[kind]
      summary.count++
      summary.totalMs += entry.duration
      summary.maxMs = Math.max(summary.maxMs, entry.duration)
    }
  }).observe({ entryTypes: ['gc'] })

  process.once('SIGINT', () => {
    const cpu = process.cpuUsage(first?.cpu)
    for (const times of Object.values(inApp)) times.sort((a, b) => a - b)
    const profile: LatencyProfile = {
      inApp,
      gc,
      loopDelay: { p50: delay.percentile(50) / 1e6, p99: delay.percentile(99) / 1e6, max: delay.max / 1e6 },
      cpuMicrosPerRequest: (cpu.user + cpu.system) / Math.max(1, requests),
      wallMs: first ? performance.now() - first.at : 0,
    }
    writeFileSync(out, JSON.stringify(profile))
    process.exit(0)
  })
}
