import { existsSync } from 'node:fs'
import { type Browser, chromium, type Page } from 'playwright-core'
import { afterEach, describe, expect, it } from 'vitest'
import { runChaos } from '../examples/cluster/chaos.js'
import { DemoCluster, type SessionMode } from '../examples/cluster/cluster.js'

const CHROMIUM = '/usr/bin/chromium'

/**
 * `npm run chaos` in a short configuration: the demo cluster (3 memcached, 3 shop instances, the balancer), with
 * every failure of the schedule, must lose no acknowledged write in either mode.
 */
describe('the chaos run', () => {
  for (const mode of ['non-sticky', 'sticky'] as const) {
    it(`loses no acknowledged cart write through node kills, empty restarts, an instance killed with a node, and a freeze (${mode})`, async () => {
      const users = 12
      const writesPerUser = 30
      const report = await runChaos({ mode, users, writesPerUser, durationMs: 12_000 })
      expect(report.events).toHaveLength(6)
      // The failures happened while users were writing, not after.
      expect(report.scheduleEndedAtMs).toBeLessThan(report.lastWriteAtMs)
      expect(report.lost).toBe(0)
      expect(report.foreign).toBe(0)
      // Requests in flight on the killed instance fail, and (non-sticky) requests that wait for a lock the
      // killed instance held; almost every write is acknowledged.
      expect(report.acknowledged).toBeGreaterThan(0.9 * users * writesPerUser)
      expect(report.relocations).toBeGreaterThan(0)
      if (mode === 'sticky') expect(report.takeovers).toBeGreaterThan(0)
    }, 90_000)
  }
})

describe('the live page', () => {
  let cluster: DemoCluster | undefined
  let browser: Browser | undefined

  afterEach(async () => {
    await browser?.close()
    await cluster?.stop()
    browser = undefined
    cluster = undefined
  })

  async function open(mode: SessionMode): Promise<Page> {
    expect(existsSync(CHROMIUM), `${CHROMIUM} (apt-get install chromium)`).toBe(true)
    cluster = await DemoCluster.start({ mode })
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] })
    const page = await browser.newPage()
    await page.goto(`${cluster.url}/`)
    return page
  }

  for (const mode of ['non-sticky', 'sticky'] as const) {
    it(`shows where the cart is stored, and keeps it when the node holding it is killed from the page (${mode})`, async () => {
      const page = await open(mode)
      const cart = async () => page.getByTestId('cart').locator('li').allTextContents()
      const text = async (testId: string) => (await page.getByTestId(testId).textContent())?.trim() ?? ''

      await page.getByTestId('add').click()
      await expect.poll(cart).toHaveLength(1)
      await page.getByTestId('add').click()
      await expect.poll(cart).toHaveLength(2)
      const before = await cart()
      const session = await text('session')
      const primary = await text('primary')
      expect(primary).toMatch(/^n[123]$/)
      expect(session).toContain(`-${primary}`)
      // As the nodes answer: the primary copy on the node the id names, the backup on another.
      await expect.poll(() => text('primary-found')).toBe(primary)
      await expect.poll(() => text('backup')).toMatch(/^n[123]$/)
      expect(await text('backup')).not.toBe(primary)
      expect(['a', 'b', 'c']).toContain(await text('instance'))

      const pid = cluster?.nodes[Number(primary.slice(1)) - 1]?.pid
      await page.getByTestId(`kill-${primary}`).click()
      await expect.poll(() => text(`state-${primary}`)).toBe('killed')
      expect(existsSync(`/proc/${pid}`)).toBe(false)

      await page.getByTestId('add').click()
      await expect.poll(cart).toHaveLength(3)
      expect((await cart()).slice(0, 2)).toEqual(before)
      expect(await text('status')).toBe('200')
      // The page asks the nodes where the copies are once the cart is drawn: wait for that answer.
      await expect.poll(() => text('primary')).not.toBe(primary)
      const moved = await text('primary')
      expect(moved).toMatch(/^n[123]$/)
      expect(await text('session')).not.toBe(session)
      await expect.poll(() => text('primary-found')).toBe(moved)
      // Two copies again: the backup on a third node, neither the new primary nor the dead one.
      await expect.poll(() => text('backup')).toMatch(/^n[123]$/)
      expect([moved, primary]).not.toContain(await text('backup'))
      // The instance that moved the session counted one relocation, and the page shows it.
      const relocations = async () =>
        (await page.locator('#instances tr td:nth-child(4)').allTextContents()).reduce(
          (sum, cell) => sum + (Number(cell) || 0),
          0,
        )
      await expect.poll(relocations).toBe(1)
    }, 60_000)
  }

  it('refuses control requests without its header (another site cannot kill the processes)', async () => {
    cluster = await DemoCluster.start({ mode: 'non-sticky' })
    const refused = await fetch(`${cluster.url}/_cluster/nodes/1/kill`, { method: 'POST' })
    expect(refused.status).toBe(403)
    expect((await cluster.state()).nodes[0]?.state).toBe('up')
    const accepted = await fetch(`${cluster.url}/_cluster/nodes/1/kill`, {
      method: 'POST',
      headers: { 'x-demo-control': '1' },
    })
    expect(accepted.status).toBe(200)
    expect((await cluster.state()).nodes[0]?.state).toBe('killed')
  }, 30_000)
})
