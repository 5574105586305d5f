// Local barge-in: the user talks over the reply. Decided from the (echo-cancelled)
// microphone level alone, so playback can stop before the server has even heard it.

export class BargeInDetector {
  /**
   * @param {{threshold?: number, holdMs?: number}} options RMS level (0..1) that counts as
   *   talking, and how long it has to last without a break
   */
  constructor({ threshold = 0.08, holdMs = 250 } = {}) {
    this.threshold = threshold;
    this.holdMs = holdMs;
    this.loudMs = 0;
  }

  /** Feeds one chunk's level; true once the user has been loud for `holdMs` in a row. */
  update(level, chunkMs) {
    this.loudMs = level >= this.threshold ? this.loudMs + chunkMs : 0;
    return this.loudMs >= this.holdMs;
  }

  reset() {
    this.loudMs = 0;
  }
}
