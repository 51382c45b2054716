import type { Readable } from 'node:stream'

/** A body Fastify sends after onSend, piece by piece: a Node stream, a web stream, or a fetch Response. */
export function isStreamed(payload: unknown): boolean {
  return (
    typeof payload === 'object' &&
    payload !== null &&
    // Fastify's own tests for each, so a stream from another realm or library counts too.
    (isNodeStream(payload) ||
      typeof (payload as { getReader?: unknown }).getReader === 'function' ||
      Object.prototype.toString.call(payload) === '[object Response]')
  )
}

function isNodeStream(payload: unknown): payload is Readable {
  return (
    typeof payload === 'object' &&
    payload !== null &&
    typeof (payload as { pipe?: unknown }).pipe === 'function' &&
    typeof (payload as { on?: unknown }).on === 'function'
  )
}

const ignore = (): void => {}

/**
 * Keeps a Node stream's failure from killing the process while onSend waits for the session to be stored: Fastify
 * listens for it only once onSend has returned the stream, and an 'error' with nobody listening is thrown. Fastify
 * still sees the failure then (the stream is errored) and answers it as it would have. The returned function
 * takes the listener off again.
 */
export function quietWhileHeld(payload: unknown): () => void {
  if (!isNodeStream(payload)) return ignore
  payload.on('error', ignore)
  return () => payload.off('error', ignore)
}

/**
 * Closes a body that an error reply replaces: Fastify never sends it, nor closes it, so a file would stay open
 * (or an upstream connection, for a proxied body).
 */
export function discardBody(payload: unknown): void {
  const body =
    Object.prototype.toString.call(payload) === '[object Response]' ? (payload as Response).body : payload
  if (isNodeStream(body)) {
    body.destroy()
  } else if (typeof (body as { cancel?: unknown } | null)?.cancel === 'function') {
    // A web stream: cancel() rejects when it is locked (being read), and then it is not ours to close.
    ;(body as ReadableStream).cancel().catch(ignore)
  }
}
