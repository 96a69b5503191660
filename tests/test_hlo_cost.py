"""Reading collectives and loop trip counts off compiled HLO text (idefics_jax.runtime.hlo_cost)."""

from idefics_jax.runtime import hlo_cost

# A TPU-style module: a layer loop whose trip count only its condition states (3 - 1 = 2 iterations), an
# all-reduce in its body, an async all-gather wrapped in a fusion, and a kernel call whose backend config spans
# lines (a line starting with "}" inside the entry must not end it).
MODULE = """HloModule jit_f, entry_computation_layout={(bf16[8,128]{1,0})->bf16[8,128]{1,0}}

%add (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%x, %y)
}

%gather_start (p: bf16[8,16]) -> (bf16[8,16], bf16[8,128]) {
  %p = bf16[8,16]{1,0:T(8,128)(2,1)} parameter(0)
  %ag = bf16[8,128]{1,0} all-gather(%p), channel_id=2, dimensions={1}, use_global_device_ids=true
  ROOT %t = (bf16[8,16]{1,0}, bf16[8,128]{1,0}) tuple(%p, %ag)
}

%body (param: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %param = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%param), index=0
  %h = bf16[8,128]{1,0:T(8,128)(2,1)} get-tuple-element(%param), index=1
  %ar = bf16[8,128]{1,0:T(8,128)(2,1)S(1)} all-reduce(%h), channel_id=1, to_apply=%add
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %out = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}) tuple(%next, %ar)
}

%cond (param.1: (s32[], bf16[8,128])) -> pred[] {
  %param.1 = (s32[]{:T(128)}, bf16[8,128]{1,0:T(8,128)(2,1)}) parameter(0)
  %limit = s32[]{:T(128)} constant(3)
  %j = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %limit), direction=LT
}

ENTRY %main (x.1: bf16[8,128]) -> bf16[8,128] {
  %x.1 = bf16[8,128]{1,0} parameter(0)
  %kernel = bf16[8,128]{1,0} custom-call(%x.1), custom_call_target="tpu_custom_call", backend_config={"a":
"{\\"block\\": 128}
}}, metadata={op_name="kernel"}
  %start = s32[]{:T(128)} constant(1)
  %init = (s32[]{:T(128)}, bf16[8,128]{1,0}) tuple(%start, %kernel)
  %loop = (s32[]{:T(128)}, bf16[8,128]{1,0}) while(%init), condition=%cond, body=%body
  %h.1 = bf16[8,128]{1,0} get-tuple-element(%loop), index=1
  %slice = bf16[8,16]{1,0} slice(%h.1), slice={[0:8], [0:16]}
  %gathered = (bf16[8,16]{1,0}, bf16[8,128]{1,0}) fusion(%slice), kind=kCustom, calls=%gather_start
  ROOT %r = bf16[8,128]{1,0} get-tuple-element(%gathered), index=1
}
"""


def test_collectives_by_kind_with_loop_iterations():
    got, loops = hlo_cost.collectives(MODULE)
    assert [(x.body, x.trips) for x in loops] == [("body", 2)]
    assert got.count == {"all-reduce": 2, "all-gather": 1}
    # Operand bytes: the all-reduce's bf16[8,128] twice, the all-gather's bf16[8,16] once.
    assert got.bytes == {"all-reduce": 2 * 8 * 128 * 2, "all-gather": 8 * 16 * 2}


def test_known_trip_count_wins_and_unknown_loops_count_once():
    known = MODULE.replace("condition=%cond, body=%body",
                           'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}')
    got, loops = hlo_cost.collectives(known)
    assert loops[0].trips == 5 and got.count["all-reduce"] == 5
    # A data-dependent condition (not `i < constant`): the trip count is unknown and the body counts once.
    unknown = MODULE.replace("direction=LT", "direction=NE")
    got, loops = hlo_cost.collectives(unknown)
    assert loops[0].trips is None and got.count["all-reduce"] == 1


def test_shape_bytes():
    assert hlo_cost.shape_bytes("(s32[], bf16[4,8]{1,0:T(8,128)(2,1)}, pred[3])") == 4 + 64 + 3
