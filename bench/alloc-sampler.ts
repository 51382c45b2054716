// Preloaded into the benchmark app by `bench/profile.ts --alloc`: V8's sampling heap profiler, keeping the samples
// of objects that were collected too, so the profile is what each function allocated (the garbage), not what was
// still alive at the end. Written to ALLOC_PROFILE on SIGINT, before the app's own SIGINT listener exits: this one
// is registered first, and an in-process inspector session calls back synchronously.
import { writeFileSync } from 'node:fs'
import { Session } from 'node:inspector'

const out = process.env.ALLOC_PROFILE
if (out) {
  const session = new Session()
  session.connect()
  session.post('HeapProfiler.startSampling', {
    samplingInterval: 4096,
    includeObjectsCollectedByMajorGC: true,
    includeObjectsCollectedByMinorGC: true,
  })
  process.once('SIGINT', () => {
    session.post('HeapProfiler.stopSampling', (error, result) => {
      if (error) console.error(error)
      else writeFileSync(out, JSON.stringify(result.profile))
      process.exit(0)
    })
  })
}
