import { CorruptSessionError } from '../errors.js'
import type { SessionRecord } from './codec.js'
import type { SessionSnapshot } from './session-state.js'

export interface SessionContent {
  /** Application data, without the cookie. */
  readonly data: Record<string, unknown>
  /** The stored cookie fields (express-session's cookie.data). */
  readonly cookie: Record<string, unknown>
}

/**
 * The JSON form users of express-session already store. The cookie is kept apart from the data, so that a
 * cookie refresh is not a modification.
 */
export function snapshotOf(session: object, cookie: object): SessionSnapshot {
  const { cookie: _ignored, ...data } = session as Record<string, unknown>
  const { expires } = cookie as { expires?: unknown }
  return {
    dataJson: JSON.stringify(data),
    cookieJson: JSON.stringify(cookie),
    expires: expires instanceof Date ? expires : null,
  }
}

export function contentOf(record: Pick<SessionRecord, 'dataJson' | 'cookieJson'>): SessionContent {
  let data: unknown
  let cookie: unknown
  try {
    data = JSON.parse(record.dataJson)
    cookie = JSON.parse(record.cookieJson)
  } catch (cause) {
    throw new CorruptSessionError('stored session is not valid JSON', { cause })
  }
  if (!isRecord(data) || !isRecord(cookie))
    throw new CorruptSessionError('stored session is not a JSON object')
  return { data, cookie }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}
