// Shows the STD plan (NFE, start timestep, timesteps) that STD Schedule / STD Stylize ran, on the node itself.
import { app } from "../../scripts/app.js";

const STD_NODES = new Set(["STDSchedule", "STDStylize", "STDLoraLoader", "STDLoadVideo", "STDStylizeVideo"]);

app.registerExtension({
  name: "comfyui_std.PlanText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!STD_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "std_plan");
      if (!widget) {
        widget = this.addWidget("text", "std_plan", "", () => {});
        widget.serialize = false;
        widget.disabled = true;
      }
      widget.value = text;
      this.setDirtySize?.(true);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
