import type { Readable } from 'node:stream'

/** A body Fastify sends after onSend, piece by piece: a Node stream, a web stream, or a fetch Response. */
export function isStreamed(payload: unknown): boolean {
  return (
    typeof payload === 'object' &&
    payload !== null &&
    // Fastify's own tests for each, so a stream from another realm or library counts too.
    (typeof (payload as { pipe?: unknown }).pipe === 'function' ||
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
/** A stream's failure while onSend held it, kept to be thrown there. */
export type Failure = { readonly error: unknown } | undefined
const NOTHING_HELD = (): Failure => undefined

/**
 * Keeps a Node stream's failure while onSend waits for the session to be stored: Fastify listens for it only once
 * onSend has returned the stream, and an 'error' with nobody listening is thrown (the process dies), while one
 * that left no trace on the stream (a stream that emits it itself, without destroy) would go unanswered. The
 * returned function takes the listener off and gives the failure, for onSend to throw: Fastify then answers it as
 * it answers a stream that fails before its headers are sent.
 */
export function holdWhileStored(payload: unknown): () => Failure {
  if (!isNodeStream(payload)) return NOTHING_HELD
  let failure: Failure
  const record = (error: unknown): void => {
    failure ??= { error }
  }
  payload.on('error', record)
  return () => {
    payload.off('error', record)
    return failure
  }
}

/**
 * Closes a body that is not going to be sent (an error reply replaces it): Fastify neither sends nor closes it, so
 * a file would stay open (or an upstream connection, for a proxied body). As Fastify closes a stream whose client
 * left: destroy(), else close(), else abort(). Never throws: it runs on the way to answering another error.
 */
export function discardBody(payload: unknown): void {
  const body =
    Object.prototype.toString.call(payload) === '[object Response]' ? (payload as Response).body : payload
  try {
    const closable = body as { destroy?: unknown; close?: unknown; abort?: unknown; cancel?: unknown } | null
    if (
      typeof closable?.cancel === 'function' &&
      typeof (body as { getReader?: unknown }).getReader === 'function'
    ) {
      // A web stream: cancel() rejects when it is locked (being read), and then it is not ours to close.
      ;(body as ReadableStream).cancel().catch(ignore)
    } else if (typeof closable?.destroy === 'function') {
      ;(body as Readable).destroy()
    } else if (typeof closable?.close === 'function') {
      ;(closable.close as (callback: () => void) => void)(ignore)
    } else if (typeof closable?.abort === 'function') {
      ;(closable.abort as () => void)()
    }
  } catch {
    // A body that fails to close is left to its owner; the error being answered is the one to report.
  }
}
