# The agent-policy change that cva's prestart hook needs (README "Integration with Kata").
#
# kata-agent runs guest hooks only from the `guest_hook_path` the host sends in
# CreateSandboxRequest, and the rules genpolicy generates (src/tools/genpolicy/rules.rego)
# refuse every hook path in their CreateSandboxRequest rule:
#
#     count(input.guest_hook_path) == 0
#
# In the policy that goes into the pod's initdata as data."policy.rego" (kata-agent enforces it
# from its start, so the host can change nothing about it), replace that one line with the
# equality on the image's hook folder; then the host can neither drop cva's hook (the pod's
# containers would start without their volumes) nor point kata at another folder:
#
#     input.guest_hook_path == "/usr/share/oci/hooks"
#
# For example, on the generated policy text:
#
#     sed -i 's|count(input.guest_hook_path) == 0|input.guest_hook_path == "/usr/share/oci/hooks"|' policy.rego
#
# and on the host, the runtime drop-in that sends that path (it is not a kernel parameter):
#
#     # /etc/kata-containers/config.d/50-cva-hooks.toml  (the runtime's config.d)
#     [hypervisor.qemu]
#     guest_hook_path = "/usr/share/oci/hooks"
#
# `cva initdata check initdata.toml` warns while a contract gives containers volumes and the
# policy does not pin this path. The rule below is the changed line in its context:

package agent_policy

CreateSandboxRequest {
    input.guest_hook_path == "/usr/share/oci/hooks"
}
