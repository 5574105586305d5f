// Gapless playback of PCM16 reply segments on one AudioContext.
// Each segment becomes an AudioBuffer (at the segment's own rate, the context resamples)
// scheduled right after the previous one. When the queue has run dry, the next segment
// starts `jitterSeconds` in the future so that following segments can arrive in time.
// Running dry in the middle of a reply (an underrun: a gap was heard) makes that
// jitter buffer longer, up to `maxJitterSeconds`. A gain node sets the volume; an analyser
// after it gives the level of what is heard.

export class Player {
  /**
   * @param {AudioContext} audioContext
   * @param {{sampleRate?: number, jitterSeconds?: number, maxJitterSeconds?: number}} options
   */
  constructor(audioContext, { sampleRate = 24000, jitterSeconds = 0.08, maxJitterSeconds = 0.4 } = {}) {
    this.audioContext = audioContext;
    this.sampleRate = sampleRate;
    this.jitterSeconds = jitterSeconds;
    this.maxJitterSeconds = maxJitterSeconds;
    this.underruns = 0;
    this.output = audioContext.createGain();
    this.output.connect(audioContext.destination);
    this.analyser = audioContext.createAnalyser();
    this.analyser.fftSize = 1024;
    this.output.connect(this.analyser);
    this.analysed = new Float32Array(this.analyser.fftSize);
    this.scheduled = new Set(); // {source, startAt, duration}
    this.nextStartAt = 0;
    this.playedSeconds = 0; // audio heard from segments that have finished
    this.onIdle = null; // called when the last scheduled segment has finished
  }

  /** True while any segment is scheduled or playing. */
  get busy() {
    return this.scheduled.size > 0;
  }

  /**
   * Queues one segment of little-endian PCM16 mono samples; returns its start (context time).
   * @param {ArrayBuffer} pcmBytes
   * @param {boolean} continuesReply false for a reply's first segment
   */
  enqueue(pcmBytes, continuesReply) {
    const samples = int16FromLittleEndian(pcmBytes);
    if (samples.length === 0) return null;
    const buffer = this.audioContext.createBuffer(1, samples.length, this.sampleRate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 0x8000;

    const now = this.audioContext.currentTime;
    const startsFresh = this.scheduled.size === 0;
    if (startsFresh && continuesReply) {
      this.underruns += 1;
      this.jitterSeconds = Math.min(this.maxJitterSeconds, this.jitterSeconds * 1.5);
    }
    const startAt = Math.max(this.nextStartAt, now + (startsFresh ? this.jitterSeconds : 0.005));
    const source = this.audioContext.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    const entry = { source, startAt, duration: buffer.duration };
    // An ended segment was heard whole; currentTime may still read the start of its last quantum.
    source.onended = () => this.finish(entry, entry.duration);
    source.start(startAt);
    this.scheduled.add(entry);
    this.nextStartAt = startAt + buffer.duration;
    return startAt;
  }

  /** Playback volume, 0..1. */
  set volume(volume) {
    this.output.gain.value = volume;
  }

  /** RMS level (0..1) of the last ~20 ms played, after the volume. */
  get level() {
    if (!this.busy) return 0;
    this.analyser.getFloatTimeDomainData(this.analysed);
    let sumSquares = 0;
    for (const sample of this.analysed) sumSquares += sample * sample;
    return Math.sqrt(sumSquares / this.analysed.length);
  }

  /** Silences everything at once (interruption); queued segments are dropped. */
  stop() {
    for (const entry of [...this.scheduled]) {
      entry.source.onended = null;
      entry.source.stop();
      this.finish(entry, this.heardOf(entry));
    }
    this.nextStartAt = 0;
  }

  /** Seconds of audio heard so far, the segments playing now included. */
  get heardSeconds() {
    let playing = 0;
    for (const entry of this.scheduled) playing += this.heardOf(entry);
    return this.playedSeconds + playing;
  }

  heardOf(entry) {
    const elapsed = this.audioContext.currentTime - entry.startAt;
    return Math.max(0, Math.min(entry.duration, elapsed));
  }

  finish(entry, heardSeconds) {
    if (!this.scheduled.delete(entry)) return;
    this.playedSeconds += heardSeconds;
    entry.source.disconnect();
    if (this.scheduled.size === 0) this.onIdle?.();
  }
}

/** Reads little-endian int16 samples regardless of the host's byte order. */
function int16FromLittleEndian(bytes) {
  const view = new DataView(bytes);
  const samples = new Int16Array(bytes.byteLength >> 1);
  for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(2 * i, true);
  return samples;
}
