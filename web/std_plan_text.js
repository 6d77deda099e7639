// Shows the STD plan (NFE, start timestep, timesteps) that STD Schedule / STD Stylize ran, on the node itself.
import { app } from "../../scripts/app.js";

const STD_NODES = new Set(["STDSchedule", "STDStylize", "STDLoraLoader", "STDLoadVideo", "STDStylizeVideo"]);

// A read-only multi-line text box (a DOM widget, like the prompt boxes): litegraph's own "text" widget draws one
// truncated line and draws no value at all when disabled.
function planWidget(node) {
  const existing = node.widgets?.find((w) => w.name === "std_plan");
  if (existing) return existing;
  const el = document.createElement("textarea");
  el.className = "comfy-multiline-input std-plan-text";
  el.readOnly = true;
  el.spellcheck = false;
  el.rows = 3;
  el.style.opacity = "0.85";
  const widget = node.addDOMWidget("std_plan", "std_plan", el, {
    getValue: () => el.value,
    setValue: (v) => { el.value = v ?? ""; },
    serialize: false,
  });
  widget.serialize = false;
  return widget;
}

app.registerExtension({
  name: "comfyui_std.PlanText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!STD_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      const widget = planWidget(this);
      widget.value = text;
      requestAnimationFrame(() => {
        const size = this.computeSize();
        this.setSize([Math.max(size[0], this.size[0]), Math.max(size[1], this.size[1])]);
        app.graph.setDirtyCanvas(true, true);
      });
    };
  },
});
