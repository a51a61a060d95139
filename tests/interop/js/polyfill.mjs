// What js-libp2p 2.10 needs and older Node.js lacks, defined before any libp2p module runs
// (peer.mjs imports this first). Node 20 (the machine's) and 18 (Debian bookworm's, which
// ensure_interop_js installs where node is missing) both pass tests/integration/test_interop_js.py.
//
// Promise.withResolvers (Node 22+): the peer store's locks (mortice -> it-queue) call it.
// Per the ECMAScript spec.
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    value: function withResolvers () {
      let resolve, reject
      const promise = new this((res, rej) => { resolve = res; reject = rej })
      return { promise, resolve, reject }
    },
    writable: true,
    configurable: true
  })
}

// Node 18 (Debian bookworm's nodejs) also lacks a global CustomEvent (Node 19+), which
// js-libp2p's event emitters construct; same shape as the DOM's.
if (typeof globalThis.CustomEvent !== 'function') {
  globalThis.CustomEvent = class CustomEvent extends Event {
    constructor (type, options = {}) {
      super(type, options)
      this.detail = options.detail ?? null
    }
  }
}
