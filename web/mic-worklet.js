// AudioWorklet processor: turns the microphone's float samples into PCM16 chunks.
// Runs on the audio thread; posts {pcm: ArrayBuffer (Int16, mono), level: RMS 0..1}
// to the main thread every `chunkMs` milliseconds of audio.

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = options.processorOptions?.chunkMs ?? 20;
    this.chunkLength = Math.round((sampleRate * chunkMs) / 1000);
    this.chunk = new Int16Array(this.chunkLength);
    this.filled = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels.length === 0) return true; // no input connected yet
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let sample = 0;
      for (const channel of channels) sample += channel[i];
      sample = Math.max(-1, Math.min(1, sample / channels.length));
      this.sumSquares += sample * sample;
      this.chunk[this.filled++] = sample < 0 ? sample * 0x8000 : sample * 0x7fff;
      if (this.filled === this.chunkLength) this.flush();
    }
    return true;
  }

  flush() {
    const level = Math.sqrt(this.sumSquares / this.chunkLength);
    const pcm = this.chunk.buffer;
    this.port.postMessage({ pcm, level }, [pcm]); // transferred: the old array is now empty
    this.chunk = new Int16Array(this.chunkLength);
    this.filled = 0;
    this.sumSquares = 0;
  }
}

registerProcessor("pcm-capture", PcmCaptureProcessor);
