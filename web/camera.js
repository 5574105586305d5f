// Optional camera: shows a preview and hands out JPEG snapshots at a fixed rate (~2 fps).

export class Camera {
  /**
   * @param {HTMLVideoElement} preview element that shows the live camera
   * @param {(jpeg: Blob) => void} onFrame called with each snapshot
   * @param {{framesPerSecond?: number, maxSide?: number, quality?: number}} options
   */
  constructor(preview, onFrame, { framesPerSecond = 2, maxSide = 640, quality = 0.75 } = {}) {
    this.preview = preview;
    this.onFrame = onFrame;
    this.intervalMs = 1000 / framesPerSecond;
    this.maxSide = maxSide;
    this.quality = quality;
    this.canvas = document.createElement("canvas");
    this.stream = null;
    this.timer = null;
    this.opening = null; // the getUserMedia call under way
  }

  get running() {
    return this.stream !== null;
  }

  /**
   * Opens the camera (`deviceId` "" = the default one) and starts snapshots; throws the
   * getUserMedia error on failure. Returns false when stop() came first.
   */
  async start(deviceId = "") {
    const video = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } };
    if (deviceId) video.deviceId = { ideal: deviceId };
    const opening = (this.opening = navigator.mediaDevices.getUserMedia({ video }));
    const stream = await opening;
    if (this.opening !== opening) {
      stream.getTracks().forEach((track) => track.stop());
      return false;
    }
    this.opening = null;
    this.stream = stream;
    this.preview.srcObject = stream;
    await this.preview.play();
    this.timer = setInterval(() => this.snapshot(), this.intervalMs);
    return true;
  }

  stop() {
    this.opening = null;
    clearInterval(this.timer);
    this.stream?.getTracks().forEach((track) => track.stop());
    this.preview.srcObject = null;
    this.stream = this.timer = null;
  }

  snapshot() {
    const { videoWidth: width, videoHeight: height } = this.preview;
    if (!width || !height) return; // no frame decoded yet
    const scale = Math.min(1, this.maxSide / Math.max(width, height));
    this.canvas.width = Math.round(width * scale);
    this.canvas.height = Math.round(height * scale);
    this.canvas.getContext("2d").drawImage(this.preview, 0, 0, this.canvas.width, this.canvas.height);
    this.canvas.toBlob((jpeg) => jpeg && this.onFrame(jpeg), "image/jpeg", this.quality);
  }
}
